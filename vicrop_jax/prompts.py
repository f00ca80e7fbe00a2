"""The paper-exact prompt templates (docs/method.md (Models and prompts))."""

GENERAL_QUESTION = "Write a general description of the image."
LLAVA_ANSWER_SUFFIX = " Answer the question using a single word or phrase."


def llava_prompt(question: str, num_images: int = 1) -> str:
    """`<image>\\nUSER: {q} Answer the question using a single word or phrase.\\nASSISTANT:`."""
    return "<image>" * num_images + f"\nUSER: {question}{LLAVA_ANSWER_SUFFIX}\nASSISTANT:"


def instructblip_prompt(question: str) -> str:
    """`Question: {q} Short answer:` (the images enter as Q-Former query embeddings, not markers)."""
    return f"Question: {question} Short answer:"


QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen2_5_vl_prompt(question: str, num_images: int = 1) -> str:
    """Qwen2.5-VL's chat template with its default system prompt, the images first, then the question with
    LLaVA's single-word suffix (the release's Qwen2.5-VL procedure), the assistant's turn opened."""
    return (f"{QWEN_SYSTEM}<|im_start|>user\n{QWEN_IMAGE * num_images}{question}{LLAVA_ANSWER_SUFFIX}<|im_end|>\n"
            "<|im_start|>assistant\n")
