"""The paper-exact prompt templates (docs/method.md (Models and prompts))."""

GENERAL_QUESTION = "Write a general description of the image."
LLAVA_ANSWER_SUFFIX = " Answer the question using a single word or phrase."


def llava_prompt(question: str, num_images: int = 1) -> str:
    """`<image>\\nUSER: {q} Answer the question using a single word or phrase.\\nASSISTANT:`."""
    return "<image>" * num_images + f"\nUSER: {question}{LLAVA_ANSWER_SUFFIX}\nASSISTANT:"


def instructblip_prompt(question: str) -> str:
    """`Question: {q} Short answer:` (the images enter as Q-Former query embeddings, not markers)."""
    return f"Question: {question} Short answer:"
