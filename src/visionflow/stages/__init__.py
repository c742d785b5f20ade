"""The six pipeline stages, one module each, each with `run(params, layout)`."""
