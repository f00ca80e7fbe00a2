"""The paper-exact prompt templates, and the yes/no questions of the competing zoom strategies."""

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

# The competing strategies' yes/no questions (FOCUS asks the first; ZoomEye all three), as ZoomEye's release words
# them for a model that sees one view (its LLaVA-1.5 setting), "the the" included; each is wrapped in the family's
# prompt like any question.
EXISTENCE_QUESTION = "Is there a {target} in the image? Answer Yes or No."
LATENT_QUESTION = ("According to your common sense knowledge and the content of the image, is it possible to find a "
                   "{target} in the image? Answer Yes or No and tell the reason.")
ANSWERING_QUESTION = ("Question: {question}\nCould you answer the question based on the the available visual "
                      "information? Answer Yes or No.")
YES_WORD, NO_WORD = "Yes", "No"
