"""Running a model one block at a time (needs transformers): measure a direction, evaluate a result."""
