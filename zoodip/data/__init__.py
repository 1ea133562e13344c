"""The training data: DreamBooth-layout subjects and their captions, the planted task, the prompt tables."""
