"""Loading the diffusion models (SD1.5 / SD2.1 / SDXL, the tiny and toy-world models), quantizing them
(optimum-quanto INT8 / INT4), the tokenizers and the token's embedding files."""
