"""The names the training kit shares: the MER modalities (in the order of the loss's pairs: text-audio,
text-vision, audio-vision), the splits, and IEMOCAP's four emotion classes."""

MODALITIES = ("text", "audio", "vision")
SPLITS = ("train", "valid", "test")
IEMOCAP_CLASSES = ["neutral", "happy", "sad", "angry"]
