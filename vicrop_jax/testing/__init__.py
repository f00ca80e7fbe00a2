"""Test and demo data made here, with no downloads: the synthetic small-detail scenes (`synthetic`), tiny
checkpoints written without PyTorch (`checkpoints`) and tiny random Hugging Face models written with
transformers' own `save_pretrained` (`hf_models`; needs the `test` extra)."""
