"""Auto-captioning of training datasets (BLIP, Florence-2, WD14 taggers) and caption editing."""
