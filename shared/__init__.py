"""Code shared by the llm-compare gateway and workers: schemas, settings, task names, state."""
