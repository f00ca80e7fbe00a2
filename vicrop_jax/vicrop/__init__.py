"""ViCrop: map methods and baselines as values (`methods`), the maps' building blocks (`maps`), box selection
and the crop (`boxes`), the jitted programs (`_pipeline`) and the `answer` API (`_api`)."""
