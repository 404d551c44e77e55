"""Activities: one module per outside system. They import only workflows.models/errors/constants."""
