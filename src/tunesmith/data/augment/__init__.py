"""Training-data augmentation: EDA edits, back-translation, dynamic masking."""
