from minilm import malloc

KEEPS_FREED_MEMORY = malloc.keep_freed_memory()   # before any jax computation: see minilm.malloc
