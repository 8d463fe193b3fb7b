"""Models: the registry of base models, LoRA fine-tuning, experts as llama.cpp models, choice scoring,
prompt clustering and device profiling."""
