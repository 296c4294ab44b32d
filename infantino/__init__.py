"""InfantinO: facial-expression recognition that keeps learning from its users.

Layout: ``training/`` turns labelled images into a backbone + head, ``registry/`` keeps
them in MLflow, ``service/`` serves them with BentoML and ``online/`` turns feedback
into new head versions. This package holds what they all share: settings, labels,
image decoding and the command-line tool.
"""

FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
EMBEDDING_DIM = 64  # every backbone ends in an embedding of this size; heads read it
