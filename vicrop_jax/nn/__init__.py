"""The networks: vision towers (CLIP ViT, EVA ViT), the Q-Former, the LLaMA decoder, the composite models that
join them (LLaVA, InstructBLIP) and greedy decoding over an explicit KV cache. No ViCrop logic lives here."""
