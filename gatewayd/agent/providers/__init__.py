"""Model providers: echo (offline default), openai, anthropic."""
