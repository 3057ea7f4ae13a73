"""The agent behind the gateway: providers, tools and the types between them."""
