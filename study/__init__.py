"""A blinded reader study: pathologists tell real from generated patches and rate how mitotic each looks.

`mitosis-ldm study make` draws the set and writes a self-contained page, the
key and a study description; `mitosis-ldm study analyse` reads the readers'
exported answers against the key. See docs/study.md.
"""

STUDY_FORMAT = "mitosis-ldm/study"
KINDS = ("real", "generated")
RATINGS = (0, 4)       # 0 = not mitotic ... 4 = certainly mitotic
CONFIDENCES = (1, 3)   # 1 = unsure ... 3 = sure
ANSWER_COLUMNS = ["study_id", "reader", "item", "real_or_generated", "mitotic_rating", "confidence", "seconds",
                  "answered_at"]
