# Video spans (grid t > 1) through the model and the Transfusion objective: losses, gradients,
# the frame coordinate, and attention inside and around the span.
from __future__ import annotations

import dataclasses

import torch

from mmgen.batch import IGNORE_INDEX, IMAGE, VIDEO
from mmgen.models import FLAVORS, build_model
from mmgen.models.tokenizers.text import ByteTokenizer
from mmgen.objectives import ObjectiveConfig, build_objective, weighted_total
from mmgen.sampling.batching import image_to_text_doc, pack_rows, text_to_image_doc

TOK = ByteTokenizer()
CFG = FLAVORS["debug"]
GRID = (2, 2, 2)              # 2 frames of 2 x 2 patches
FRAME = GRID[1] * GRID[2]     # positions per frame
CAPTION = "ball"


def clip(gen: torch.Generator, grid=GRID) -> torch.Tensor:
    return torch.rand(grid[0] * grid[1] * grid[2], CFG.patch_dim, generator=gen) * 2 - 1


def make_batch(seed: int = 0):
    """Row 0: text->video (target clip), then video->text (condition clip). Row 1: text->image
    then padding, so video and image spans share the batch."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[text_to_image_doc(TOK, CAPTION, clip(gen), GRID),
             image_to_text_doc(TOK, clip(gen), GRID, "moves left")],
            [text_to_image_doc(TOK, "dot", clip(gen, (1, 2, 3)), (1, 2, 3))]]
    return pack_rows(rows, TOK, seq_len=64)


def model_with_visual_head(**overrides):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, **overrides))
    # init zeroes the visual head, which would hide any dependence of the visual outputs
    torch.nn.init.normal_(model.visual_out.weight, std=0.1)
    return model


def span_rows(batch, s: int) -> slice:
    """Rows of span ``s`` in ``batch.patches`` (and in the model's "visual" output)."""
    before = int(batch.spans.length[:s].sum())
    return slice(before, before + int(batch.spans.length[s]))


def test_video_batch_layout():
    batch = make_batch()
    assert batch.spans.grid.tolist() == [list(GRID), list(GRID), [1, 2, 3]]
    assert batch.spans.modality.tolist() == [VIDEO, VIDEO, IMAGE]
    assert batch.spans.is_target.tolist() == [True, False, True]
    start, n = int(batch.spans.start[0]), int(batch.spans.length[0])
    assert (batch.modality[0, start:start + n] == VIDEO).all()
    # frame-major order: the first FRAME positions are frame 0 (t = 0), the next frame 1
    assert batch.coords[0, start:start + n, 0].tolist() == [0] * FRAME + [1] * FRAME
    assert (batch.targets[batch.span_ids >= 0] == IGNORE_INDEX).all()


def test_training_step_on_video_spans_has_finite_losses_and_gradients():
    model = model_with_visual_head()
    objective = build_objective(ObjectiveConfig())
    batch = make_batch()
    batch.patches = batch.patches.clone().requires_grad_(True)
    counts = objective.local_counts(batch)
    assert int(counts["visual"]) == 8 + 6             # target clip + target image, not the condition
    losses = objective(model, batch, counts, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values()), losses
    weighted_total(losses, {"text": 1.0, "visual": 1.0}).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # every input patch of both clips is in the graph: the target clip through its flow loss,
    # the condition clip through the caption that reads it
    for s in (0, 1):
        per_patch = batch.patches.grad[span_rows(batch, s)].abs().sum(-1)
        assert (per_patch > 0).all(), (s, per_patch)
    # the frame code: rows t = 0 and t = 1 of the learned table get gradient, unused rows none
    t_grad = model.visual_pos.t.weight.grad.abs().sum(-1)
    assert (t_grad[:2] > 0).all() and (t_grad[2:] == 0).all(), t_grad
    assert (model.patch_in.weight.grad != 0).any() and (model.visual_out.weight.grad != 0).any()


def test_frame_coordinate_reaches_the_model_only_through_the_position_code():
    """Relabelling the frames (t = 1 first, then t = 0) with the same patches changes the
    clip's outputs under the learned (t, h, w) code and changes nothing without it."""
    def relabelled(batch):
        start, n = int(batch.spans.start[0]), int(batch.spans.length[0])
        batch.coords[0, start:start + n, 0] = 1 - batch.coords[0, start:start + n, 0]
        return batch

    rows = span_rows(make_batch(), 0)
    learned, plain = model_with_visual_head(), model_with_visual_head(visual_pos="none")
    with torch.no_grad():
        delta = (learned(make_batch())["flow"] - learned(relabelled(make_batch()))["flow"]).abs()
        assert (delta[rows].amax(-1) > 1e-4).all(), delta[rows]
        assert torch.equal(plain(make_batch())["flow"], plain(relabelled(make_batch()))["flow"])


def test_attention_inside_a_video_span_is_bidirectional():
    """A change to frame 1's input reaches frame 0's outputs (full attention inside the clip);
    text before the clip and the other packed document never see it; the caption after a
    condition clip does."""
    model = model_with_visual_head()

    def outputs(batch):
        # a dummy target everywhere: the text head then reads the hidden state of every position
        real = batch.document_ids >= 0
        batch.targets = torch.where(real, torch.zeros_like(batch.targets), IGNORE_INDEX)
        with torch.no_grad():
            out = model(batch)
        return out["lm"][:int(real[0].sum())], out["flow"]

    base = make_batch()
    doc0 = int((base.document_ids[0] == 0).sum())
    for s in (0, 1):                                      # the target clip, the condition clip
        start, n = int(base.spans.start[s]), int(base.spans.length[s])
        rows = span_rows(base, s)
        h0, v0 = outputs(make_batch())
        edited = make_batch()
        edited.patches[rows.start + FRAME + 1] += 1.0     # a patch of frame 1
        h1, v1 = outputs(edited)
        delta = (h1 - h0).abs().amax(-1)
        frame0 = (v1 - v0)[rows][:FRAME].abs().amax(-1)
        assert (frame0 > 0).all(), f"span {s}: frame 0 does not see frame 1: {frame0}"
        assert (delta[start:start + FRAME] > 0).all()
        doc_start = 0 if s == 0 else doc0
        assert delta[doc_start:start].max() == 0, f"span {s}: text before the clip sees it"
        other = slice(doc0, None) if s == 0 else slice(0, doc0)
        assert delta[other].max() == 0, f"span {s}: another document sees the clip"
        if s == 1:
            assert delta[start + n:].min() > 0, "the caption after a condition clip must read it"


def test_video_batches_from_the_data_pipeline_train(tmp_path):
    """The real video path: mp4 shards -> decode -> frames at video_fps -> packed documents
    with (frames, h/p, w/p) spans; one Transfusion step on such a batch."""
    from mmgen.data import DataConfig, build_dataloader
    from mmgen.data.config import SourceConfig
    from mmgen.data.synthetic.shapes_video import write_video_shards

    write_video_shards(str(tmp_path / "video"), 8, 4, image_size=16, num_frames=8, fps=8)
    cfg = DataConfig(name="video", sources={"video": SourceConfig(str(tmp_path / "video"), type="video")},
                     weights={"video": 1.0}, image_size=16, patch_size=4, seq_len=128,
                     batch_size=2, num_workers=0, video_frames=2, video_fps=4.0)
    batch = next(iter(build_dataloader(cfg, TOK, 0, 1)))
    assert len(batch.spans) >= 2 and (batch.spans.modality == VIDEO).all()
    assert (batch.spans.grid == torch.tensor([2, 4, 4])).all()
    assert set(batch.meta["task"]) and set(batch.meta["task"]) <= {"t2v", "v2t"}
    model = model_with_visual_head()
    objective = build_objective(ObjectiveConfig())
    counts = objective.local_counts(batch)
    losses = objective(model, batch, counts, torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in losses.values()), losses
    weighted_total(losses, {"text": 1.0, "visual": 1.0}).backward()
    assert model.visual_pos.t.weight.grad[1].abs().sum() > 0, "frame 1's code got no gradient"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
