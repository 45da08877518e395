import pytest

from rollout.prompts import load_interactive_script, load_training_prompts, resolve_switch_frames
from slotmem.config import TRAIN_SWITCH_CHOICES
from toyworld.configs import PROMPTS
from toyworld.language import MAX_PROMPT_BYTES, describe, parse
from toyworld.palette import first_pixel_frame
from toyworld.prompt_files import prompt_file_texts
from toyworld.scripts import interactive_script, memory_script, training_script, two_prompt_script
from toyworld.world import EVENT_FRAMES, simulate

GENERATORS = (two_prompt_script, interactive_script, memory_script, training_script)


@pytest.mark.parametrize("make", GENERATORS)
def test_scripts_are_deterministic_per_seed(make):
    assert make(5) == make(5)
    assert make(5) != make(6) or make(5) != make(7)
    assert make(5).world(1) == make(5).world(1) and make(5).world(1) != make(5).world(2)


@pytest.mark.parametrize("make", GENERATORS)
def test_prompts_describe_what_is_visible_at_the_end_of_each_segment(make):
    """Independent check: the simulated visibility, not the plan, against what the parser reads."""
    for seed in range(6):
        script = make(seed)
        world = script.world(seed)
        trace = simulate(world)
        colours = [k[0] for k in script.kinds]
        for prompt, (lo, hi) in zip(script.prompts, script.segments()):
            scene = parse(prompt)
            assert len(prompt.encode()) <= MAX_PROMPT_BYTES
            assert scene.background == script.background
            last = first_pixel_frame(hi - 1)
            visible = {colours[i] for i in range(len(colours)) if trace.full[last, i]}
            assert visible == {c for c, _ in scene.present}, (prompt, visible)
            for colour, _ in scene.absent:
                assert not trace.visible[last, colours.index(colour)]


@pytest.mark.parametrize("make", GENERATORS)
def test_events_happen_early_in_the_segment_that_announces_them(make):
    for seed in range(10):
        script = make(seed)
        for k, (lo, hi) in enumerate(script.segments()):
            scene = parse(script.prompts[k])
            event = script.segment_event(k)
            assert (event is None) == (scene.event is None)
            if event is not None:
                assert event.kind == scene.event and script.kinds[event.entity] == scene.subject
                assert lo < event.frame <= lo + 4 and event.frame + EVENT_FRAMES <= hi


def test_interactive_switches_are_the_rollouts():
    script = interactive_script(0)
    assert list(script.switch_frames) == resolve_switch_frames(6, 240) == [42, 81, 120, 162, 201]
    assert len(script.prompts) == 6


def test_two_prompt_switches_come_from_the_training_choices():
    for seed in range(20):
        script = two_prompt_script(seed)
        assert len(script.prompts) == 2 and script.switch_frames[0] in TRAIN_SWITCH_CHOICES


def test_memory_scripts_keep_the_entity_away_beyond_the_window():
    for seed in range(10):
        script = memory_script(seed)
        leaves = {}
        returns = 0
        for ev in script.events:
            if ev.kind == "leave":
                leaves[ev.entity] = ev.frame
            elif ev.kind == "return":
                returns += 1
                away = ev.frame - (leaves[ev.entity] + EVENT_FRAMES)
                assert away > 20  # the local attention window is 12 latent frames
        assert returns >= 1


def test_interactive_scripts_have_a_leave_and_its_return():
    for seed in range(10):
        kinds = [(e.kind, e.entity) for e in interactive_script(seed).events]
        assert any(("return", i) in kinds for k, i in kinds if k == "leave")


def test_shipped_prompt_files_are_current_and_load():
    for name, text in prompt_file_texts().items():
        assert (PROMPTS / name).read_text(encoding="utf-8") == text, f"rerun python -m toyworld.prompt_files ({name})"
    pairs = load_training_prompts(PROMPTS / "train_pairs.txt")
    assert len(pairs) == 200 and all(len(p) == 2 for p in pairs)
    for a, b in pairs:
        parse(a), parse(b)
    script = load_interactive_script(PROMPTS / "interactive.jsonl")
    assert len(script.prompts) == 6
    assert resolve_switch_frames(6, 240, script.switch_frames) == [42, 81, 120, 162, 201]
    assert len(load_interactive_script(PROMPTS / "memory_benchmark.jsonl", 19).prompts) == 6


def test_describe_and_parse_invert_each_other():
    cases = [("grey", [("red", "circle"), ("blue", "square")], None, None),
             ("navy", [], None, None),
             ("black", [("blue", "square"), ("green", "triangle")], "leave", ("yellow", "triangle")),
             ("grey", [], "leave", ("red", "circle")),
             ("grey", [("blue", "square")], "return", ("red", "circle")),
             ("grey", [], "return", ("red", "circle")),
             ("navy", [("red", "circle"), ("blue", "square")], "enter", ("green", "triangle")),
             ("black", [], "enter", ("yellow", "square"))]
    for bg, others, event, subject in cases:
        scene = parse(describe(bg, others, event, subject))
        assert scene.background == bg and scene.event == event and scene.subject == subject
        expected = [*others, subject] if event in ("return", "enter") else others
        assert list(scene.present) == expected
        assert list(scene.absent) == ([subject] if event == "leave" else [])


@pytest.mark.parametrize("text", ["a red dog on a grey background", "a red circle on a pink background",
                                  "a red circle, a blue square on a grey background",
                                  "the red circle leaves, a red square remains on a grey background",
                                  "the red circle leaves, a blue square remain on a grey background",
                                  "a red fox walks through snow"])
def test_parse_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="prompt"):
        parse(text)
