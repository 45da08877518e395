import math

import numpy as np
import pytest

from toyworld.palette import BACKGROUNDS, COLOURS, FRAME_SIZE, SIZES, first_pixel_frame, latent_frame_of, pixel_frames
from toyworld.world import EVENT_FRAMES, EntitySpec, Event, WorldSpec, render, shape_coverage, simulate


def _spec(**changes):
    base = dict(background="grey", entities=(EntitySpec("red", "circle", "large"), EntitySpec("blue", "square", "small")),
                initial=(0, 1), events=(), num_frames=60, motion_seed=3)
    return WorldSpec(**{**base, **changes})


def test_clock_matches_the_wan_vae():
    assert pixel_frames(240) == 957  # 4 * (240 - 1) + 1
    assert first_pixel_frame(0) == 0 and first_pixel_frame(1) == 1 and first_pixel_frame(2) == 5
    assert [latent_frame_of(p) for p in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("shape, area", [("circle", math.pi * 64), ("square", 256), ("triangle", 128)])
def test_shape_coverage_has_the_shape_area(shape, area):
    cov = shape_coverage(shape, 31.3, 30.8, SIZES["large"])
    assert cov.sum() == pytest.approx(area, rel=0.04)
    ys, xs = np.nonzero(cov > 0.5)
    assert xs.max() - xs.min() + 1 in (15, 16, 17) and ys.max() - ys.min() + 1 in (15, 16, 17)


def test_triangle_points_up():
    cov = shape_coverage("triangle", 32, 32, 16)
    rows = cov.sum(1)[cov.sum(1) > 0]
    assert rows[0] < rows[-1] / 4


def test_render_is_deterministic_and_uses_the_palette():
    a, b = render(_spec()), render(_spec())
    assert a.shape == (pixel_frames(60), FRAME_SIZE, FRAME_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(_spec(motion_seed=4)))
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    for rgb in (BACKGROUNDS["grey"], COLOURS["red"], COLOURS["blue"]):
        assert rgb in colours


def test_bouncing_entities_stay_inside():
    trace = simulate(_spec(num_frames=240))
    assert trace.full.all()
    half = SIZES["large"] / 2
    assert trace.centre[:, 0].min() >= half - 1e-6 and trace.centre[:, 0].max() <= FRAME_SIZE - half + 1e-6


def test_leave_and_return_complete_within_event_frames():
    spec = _spec(num_frames=120, events=(Event(20, "leave", 0), Event(70, "return", 0)))
    trace = simulate(spec)
    assert trace.visible[first_pixel_frame(20), 0]
    gone = first_pixel_frame(20 + EVENT_FRAMES)
    back = first_pixel_frame(70)
    assert not trace.visible[gone:back, 0].any()  # away for 70 - 30 = 40 latent frames
    assert trace.full[first_pixel_frame(70 + EVENT_FRAMES):, 0].all()
    assert trace.full[:, 1].all()  # the other entity never leaves


def test_enter_brings_in_a_new_entity():
    spec = _spec(initial=(0,), events=(Event(10, "enter", 1),), num_frames=40)
    trace = simulate(spec)
    assert not trace.visible[:first_pixel_frame(10), 1].any()
    assert trace.full[first_pixel_frame(10 + EVENT_FRAMES):, 1].all()


@pytest.mark.parametrize("changes, field", [
    (dict(entities=(EntitySpec("red", "circle", "large"), EntitySpec("red", "square", "small"))), "colours"),
    (dict(events=(Event(5, "return", 0),)), "return of entity 0 while it is in"),
    (dict(events=(Event(5, "leave", 0), Event(8, "return", 0))), "closer than EVENT_FRAMES"),
    (dict(background="white"), "background"),
])
def test_invalid_specs_name_the_problem(changes, field):
    with pytest.raises(ValueError, match=field):
        _spec(**changes)
