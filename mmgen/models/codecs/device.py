# Encoding on the device: a batch whose continuous spans hold pixel patches -> the same batch on latents.
"""With ``data.encode_on=device`` the data workers send, for every continuous span of a raw
image or clip, pixel patches of side ``downsample * patch_size`` (``DataConfig.worker_codec``):
one pixel patch per latent patch, so the span grid, the token layout, every mask and every
count are already the final ones. :class:`DeviceEncoder` then swaps ``patches`` for the
codec's latent rows, frame by frame and batched over the micro-batch's frames, under no_grad,
on the accelerator. Nothing else in the batch changes: the contract (``mmgen.batch``) holds
before and after, only ``patches`` changes width (pixel -> latent ``payload_dim``).

Documents read from cached latents (``mmgen data encode``) are marked ``meta["encoded"]``;
their rows already hold the latent rows, zero-padded to the pixel width, and are only cut back.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from mmgen.batch import CONTINUOUS, MultimodalBatch
from mmgen.models.codecs.base import LatentCodec
from mmgen.models.codecs.pixel import unpatchify


class DeviceEncoder:
    """Encodes a micro-batch's continuous spans with a frozen codec on its device.

    Args:
        codec: a continuous :class:`LatentCodec` (a VAE).
        device: where the codec runs (the training device).
        bf16: encode under bf16 autocast (the trainer sets it on CUDA when the run trains in
            bf16); the latents come back in fp32 either way.
        max_frames: frames per encoder call (bounds the activation memory).
    """

    def __init__(self, codec: LatentCodec, device: torch.device | str, bf16: bool = False,
                 max_frames: int = 64):
        if codec.kind != CONTINUOUS:
            raise ValueError(f"device encoding needs a continuous codec, {codec.name} is discrete")
        self.codec = codec.to(device)
        self.device = torch.device(device)
        self.bf16, self.max_frames = bf16, max_frames
        self.pixel_patch = codec.downsample * codec.patch_size

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def __call__(self, batch: MultimodalBatch) -> MultimodalBatch:
        """``batch`` with ``patches`` replaced by latent rows (row-major span order kept)."""
        spans = batch.spans
        kinds, grids = spans.kind.tolist(), spans.grid.tolist()
        cont = [i for i, k in enumerate(kinds) if k == CONTINUOUS]
        if not cont:
            return dataclasses.replace(batch, patches=batch.patches.new_zeros(0, self.codec.payload_dim))
        encoded = self._encoded_spans(batch)
        P, C = self.pixel_patch, getattr(self.codec, "in_channels", 3)
        pieces: list[torch.Tensor | None] = [None] * len(cont)
        frames, owners = [], []            # raw frames to encode, (piece index, frame index)
        offset = 0
        for j, s in enumerate(cont):
            t, h, w = grids[s]
            rows = batch.patches[offset:offset + t * h * w]
            offset += t * h * w
            if s in encoded:               # cached latents: the first payload_dim columns
                pieces[j] = rows[:, :self.codec.payload_dim].float()
                continue
            per_frame = rows.reshape(t, h * w, -1)
            for f in range(t):
                frames.append(unpatchify(per_frame[f], h, w, P, C))
                owners.append((j, f, t))
        rows_of = self._encode_frames(frames)
        by_piece: dict[int, list] = {}
        for (j, f, t), r in zip(owners, rows_of):
            by_piece.setdefault(j, []).append(r)
        for j, parts in by_piece.items():
            pieces[j] = torch.cat(parts)
        return dataclasses.replace(batch, patches=torch.cat(pieces))

    def _encode_frames(self, frames: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each frame's latent rows, frames of one size encoded together in chunks."""
        out: list[torch.Tensor | None] = [None] * len(frames)
        by_size: dict[tuple, list[int]] = {}
        for i, f in enumerate(frames):
            by_size.setdefault(tuple(f.shape), []).append(i)
        for idx in by_size.values():
            for k in range(0, len(idx), self.max_frames):
                chunk = idx[k:k + self.max_frames]
                x = torch.stack([frames[i] for i in chunk]).to(self.device)
                with self._autocast():
                    z = self.codec.encode_latents(x).float()
                for i, zi in zip(chunk, z):
                    out[i] = self.codec.latent_rows(zi)
        return out

    @staticmethod
    def _encoded_spans(batch: MultimodalBatch) -> set[int]:
        """Span indices whose document came from cached latents (``meta["encoded"]``)."""
        flags = batch.meta.get("encoded")
        if not flags or not any(flags):
            return set()
        rows, starts = batch.spans.row.tolist(), batch.spans.start.tolist()
        doc_of = batch.document_ids.cpu()
        return {s for s, (r, st) in enumerate(zip(rows, starts)) if flags[int(doc_of[r, st])]}
