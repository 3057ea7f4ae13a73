"""HTTP transports: the site (limits), REST, SSE, WebSocket, OpenAI API, static dashboard."""
