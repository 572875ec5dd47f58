"""Photometric specs (the `device_ops.PhotometricSpec.from_config` form) shared by the tests."""

MOCO_V2 = {
    "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                     "hue": 0.1},
    "grayscale": {"p": 0.2},
    "gaussian_blur": {"p": 0.5, "sigma": (0.1, 2.0)},
    "normalize": {},
}
DINO_GLOBAL_2 = {
    "color_jitter": {"p": 0.8, "brightness": 0.4, "contrast": 0.4, "saturation": 0.2,
                     "hue": 0.1},
    "grayscale": {"p": 0.2},
    "gaussian_blur": {"p": 0.1},
    "solarize": {"p": 0.2},
    "normalize": {},
}
