"""Calibration prompts for the text tower: generic class names times CIFAR-style templates.

Data-free means no dataset's label set is assumed: the default names are everyday concepts
written for this project, so the text activations seen during calibration cover what CLIP
is typically asked about without copying any benchmark's classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from d4c_core.errors import SpecError

GENERIC_NAMES: tuple[str, ...] = (
    # animals
    "cat", "dog", "horse", "cow", "sheep", "pig", "goat", "chicken", "duck", "goose",
    "rabbit", "mouse", "squirrel", "fox", "wolf", "bear", "lion", "tiger", "leopard",
    "elephant", "giraffe", "zebra", "monkey", "gorilla", "kangaroo", "deer", "camel",
    "owl", "eagle", "parrot", "pigeon", "penguin", "flamingo", "swan", "fish", "shark",
    "whale", "dolphin", "octopus", "crab", "turtle", "frog", "snake", "lizard",
    "butterfly", "bee", "spider", "snail", "ladybug", "jellyfish",
    # vehicles
    "car", "truck", "bus", "bicycle", "motorcycle", "train", "airplane", "helicopter",
    "boat", "ship", "sailboat", "tractor", "scooter", "taxi", "ambulance", "fire truck",
    "van", "submarine", "rocket", "skateboard",
    # furniture and household objects
    "chair", "table", "sofa", "bed", "lamp", "clock", "mirror", "bookshelf", "desk",
    "door", "window", "curtain", "pillow", "blanket", "vase", "bucket", "umbrella",
    "candle", "key", "basket", "ladder", "toothbrush", "towel", "bathtub", "sink",
    # electronics and tools
    "television", "computer", "laptop", "keyboard", "telephone", "camera", "headphones",
    "microphone", "radio", "refrigerator", "microwave", "toaster", "washing machine",
    "hammer", "scissors", "screwdriver", "wrench", "saw", "shovel", "flashlight",
    # clothing and accessories
    "shirt", "dress", "hat", "shoe", "boot", "sock", "jacket", "backpack", "handbag",
    "glasses", "watch", "necklace", "ring", "tie", "glove",
    # food and drink
    "pizza", "apple", "banana", "orange", "strawberry", "grape", "lemon", "pear",
    "watermelon", "pineapple", "tomato", "carrot", "potato", "broccoli", "mushroom",
    "bread", "cake", "cookie", "sandwich", "hamburger", "hot dog", "sushi", "egg",
    "cheese", "donut", "ice cream", "coffee", "cup of tea", "bottle", "wine glass",
    # scenery and places
    "mountain", "beach", "forest", "river", "lake", "waterfall", "desert", "island",
    "volcano", "field", "garden", "bridge", "castle", "church", "lighthouse", "skyscraper",
    "house", "road", "street", "city", "village", "farm", "park", "cave", "glacier",
    # everyday things and objects of play
    "tree", "flower", "rose", "sunflower", "cactus", "leaf", "rock", "cloud", "rainbow",
    "ball", "kite", "guitar", "piano", "violin", "drum", "book", "pencil", "teddy bear",
    "balloon", "tent",
)  # fmt: skip

# The 18 CIFAR templates of CLIP's zero-shot evaluation (generic photo variations).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a blurry photo of a {c}.",
    "a black and white photo of a {c}.",
    "a low contrast photo of a {c}.",
    "a high contrast photo of a {c}.",
    "a bad photo of a {c}.",
    "a good photo of a {c}.",
    "a photo of a small {c}.",
    "a photo of a big {c}.",
    "a photo of the {c}.",
    "a blurry photo of the {c}.",
    "a black and white photo of the {c}.",
    "a low contrast photo of the {c}.",
    "a high contrast photo of the {c}.",
    "a bad photo of the {c}.",
    "a good photo of the {c}.",
    "a photo of the small {c}.",
    "a photo of the big {c}.",
)


def fill_template(template: str, classname: str) -> str:
    """``{c}`` substitution without ``str.format`` (other braces in a template stay literal)."""
    if "{c}" not in template:
        raise SpecError(f"template {template!r} has no '{{c}}' placeholder")
    return template.replace("{c}", classname)


def calibration_prompts(
    classnames: Sequence[str] = (), templates: Sequence[str] = (), n: int = 512, seed: int = 0
) -> list[str]:
    """``n`` prompts drawn from every classname x template pair, in a seeded shuffled order.

    Empty ``classnames``/``templates`` mean the built-in generic sets. When there are fewer
    pairs than ``n`` the shuffled list is cycled, so the result always has length ``n``.
    """
    if n <= 0:
        raise SpecError(f"number of prompts must be > 0, got {n}")
    names = tuple(classnames) or GENERIC_NAMES
    temps = tuple(templates) or DEFAULT_TEMPLATES
    combos = [fill_template(t, c) for c in names for t in temps]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(combos), generator=gen).tolist()
    return [combos[order[i % len(order)]] for i in range(n)]
