"""DreamBooth evaluation prompts (paper Tables S2 and S3) and the subject table (Table S1).

Templates are format strings: {0} is the unique token (the learned placeholder), {1} the class noun.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd

from zoodip.errors import ZoodipError

# Table S2: living subjects (dogs and cats).
LIVING_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]

# Table S3: non-living subjects (objects).
OBJECT_PROMPTS = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
]


def load_subjects() -> pd.DataFrame:
    """The 30 DreamBooth subjects (Table S1): columns subject, class, living (bool), initializer."""
    with resources.files("zoodip").joinpath("assets/dreambooth_subjects.csv").open() as f:
        df = pd.read_csv(f, dtype={"subject": str, "class": str, "initializer": str})
    df["living"] = df["living"].astype(str).str.lower().eq("true")
    return df


def subject_info(subject: str) -> dict:
    """{"subject", "class", "living", "initializer"} for one DreamBooth subject (e.g. dog6)."""
    df = load_subjects()
    rows = df[df["subject"] == subject]
    if rows.empty:
        names = ", ".join(df["subject"].head(5))
        raise ZoodipError(f"unknown DreamBooth subject {subject!r}; valid names include {names} ({len(df)} in all)")
    row = rows.iloc[0]
    return {"subject": subject, "class": row["class"], "living": bool(row["living"]), "initializer": row["initializer"]}


def _fill(template: str, token: str, noun: str) -> str:
    return " ".join(template.format(token, noun).split())  # collapse the double space an empty slot leaves


def eval_prompts(placeholder: str, class_noun: str, living: bool, use_class_token: bool) -> list[str]:
    """The 25 generation prompts for a subject (Tables S2/S3).

    Textual-inversion methods leave the class noun out (S1.1): use_class_token=False gives "a <dog6> in the jungle";
    use_class_token=True gives "a <dog6> dog in the jungle" (the DreamBooth protocol).
    """
    templates = LIVING_PROMPTS if living else OBJECT_PROMPTS
    return [_fill(t, placeholder, class_noun if use_class_token else "") for t in templates]


def text_prompts(class_noun: str, living: bool) -> list[str]:
    """The CLIP-T text for each prompt of `eval_prompts`, row-aligned: the placeholder replaced by the class noun
    ("a dog in the jungle"), since the text encoder of the scoring CLIP does not know the learned token (S1.2)."""
    templates = LIVING_PROMPTS if living else OBJECT_PROMPTS
    return [_fill(t, class_noun, "") for t in templates]
