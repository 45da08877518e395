"""What the toy world is made of: colours, shapes, backgrounds, the hidden attribute, and its clock.

Entity colours are saturated and far apart in RGB, backgrounds are dark or grey, so a pixel's nearest
palette colour says whether it belongs to an entity and to which one (the judge relies on this; within
one video every entity has its own colour). The hidden attribute is the entity's size: no prompt
mentions it, it is drawn per video and constant for that entity, and it survives the 4x spatial VAE
and blur (a stripe pattern a few pixels wide would not).
"""

from __future__ import annotations

# RGB of the entity colours and the backgrounds
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 100, 240),
    "yellow": (235, 215, 40),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (15, 15, 15),
    "grey": (110, 110, 110),
    "navy": (20, 30, 85),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# hidden attribute: extent in pixels (circle diameter, square side, triangle base = height)
SIZES: dict[str, int] = {"small": 10, "large": 16}

FRAME_SIZE = 64  # pixels per side (16x16 latent through the toy VAE's 4x spatial stride)
FPS = 16  # Wan2.1's frame rate
VAE_TEMPORAL_STRIDE = 4  # Wan VAE: latent frame 0 <- pixel frame 0, latent f >= 1 <- pixel frames 4f-3 .. 4f
LATENT_FRAMES = 240  # 60 s (anchors-video §2.1: 240 latent -> 957 pixel frames)
CHUNK = 3  # latent frames per streaming chunk (model.num_frame_per_block)
CLIP_FRAMES = 21  # latent frames of a teacher / training window (trainer.window_frames, 7 chunks)


def pixel_frames(latent_frames: int) -> int:
    """Pixel frames of a video with this many latent frames: 4(F-1)+1 (957 for 240)."""
    return VAE_TEMPORAL_STRIDE * (latent_frames - 1) + 1


def first_pixel_frame(latent_frame: int) -> int:
    """First pixel frame that latent frame ``latent_frame`` encodes."""
    return max(0, VAE_TEMPORAL_STRIDE * latent_frame - (VAE_TEMPORAL_STRIDE - 1))


def latent_frame_of(pixel_frame: int) -> int:
    """The latent frame that encodes pixel frame ``pixel_frame`` (inverse of first_pixel_frame's grouping)."""
    return (pixel_frame + VAE_TEMPORAL_STRIDE - 1) // VAE_TEMPORAL_STRIDE
