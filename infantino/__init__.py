"""InfantinO's ground floor: what every other part shares, with no model framework in it.

``settings`` (configuration by concern), ``images`` (one decoder and preprocessing for
training and serving), ``faces`` (detectors and crops), ``regions`` (an upload -> the model
inputs to classify: the whole image or its faces) and ``embeddings`` (labelled embedding
sets). Nothing here imports torch, MLflow or BentoML; every other package builds on it.
"""

FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
EMBEDDING_DIM = 64  # every backbone ends in an embedding of this size; heads read it
