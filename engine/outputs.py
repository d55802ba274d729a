"""Write a render to disk with everything needed to reproduce it, and read that back.

image.png carries the layout and settings as PNG text (key "threedis"), so the
picture alone is enough to re-render it (with its depth map, saved beside it).
The settings say where the depth came from (stage 1 with its settings, or the
user) and whether SAM2 ran. Beside it: depth.png (the depth as rendered),
layout.png, stage1-rgb.png (stage 1's RGB preview, when stage 1 ran), one
mask-<i>.png per instance whose region came from a mask (i as in instances[i]),
and the report files.

Existing files are never replaced unless overwrite=True: the whole set (image,
depth, layout picture, masks, report files) gets the first free numbered suffix
(image-1.png, depth-1.png, report-1.json, ...), so one render's files always
share a suffix.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from threedis.engine.errors import UserError
from threedis.engine.paths import file_problem, folder_problem, input_file, inside, make_folder

__all__ = [
    "METADATA_KEY",
    "metadata_for",
    "read_metadata",
    "Rerender",
    "rerender_from_png",
    "render_kwargs_from_metadata",
    "save_image_new",
    "replace_file",
    "check_output_folder",
    "remove_stale_temp",
    "save_result",
]

METADATA_KEY = "threedis"
_REPORT_KINDS = {"json": "report", "text": "report_text"}  # Report.save's keys -> ours
_OPTION_KEYS = ("chunk", "append_instances", "permute_tokens")  # settings -> RenderOptions


def metadata_for(result: Any) -> dict:
    """The JSON stored in image.png: layout, seed and the render settings."""
    settings = dict(result.settings)
    return {"layout": result.layout.to_dict(), "seed": result.seed, **settings}


def _stage(result: Any, folder: Path, pictures: bool) -> dict[str, Path]:
    """Write every output into `folder` under its plain name; returns kind -> path."""
    from threedis.engine.pictures import draw_layout, save_rule_pictures

    started = time.perf_counter()
    info = PngInfo()
    info.add_itxt(METADATA_KEY, json.dumps(metadata_for(result), ensure_ascii=False))
    paths = {"image": folder / "image.png", "depth": folder / "depth.png", "layout": folder / "layout.png"}
    result.image.save(paths["image"], pnginfo=info)
    result.depth.save(paths["depth"])
    draw_layout(result.layout, result.depth).save(paths["layout"])
    stage1_rgb = getattr(result, "stage1_rgb", None)
    if stage1_rgb is not None:
        paths["stage1_rgb"] = folder / "stage1-rgb.png"
        stage1_rgb.save(paths["stage1_rgb"])
    for i, mask in enumerate(getattr(result, "masks", None) or []):
        if mask is not None:
            paths[f"mask-{i}"] = folder / f"mask-{i}.png"
            mask.convert("L").save(paths[f"mask-{i}"])
    if pictures:  # what the attention rule saw: regions.png, attention*.png
        paths.update(save_rule_pictures(result, paths["image"]))
    report_dir = folder / "report"
    report_dir.mkdir()
    # the written report also times the writing of the pictures above ("save")
    report = result.report.with_stage("save", time.perf_counter() - started, files=len(paths))
    saved = report.save(report_dir)
    for kind, path in saved.items():
        path = Path(path)
        target = folder / path.name
        os.replace(path, target)
        paths[_REPORT_KINDS.get(kind, kind)] = target
    return paths


def _with_suffix(name: str, suffix: str) -> str:
    stem, dot, ext = name.partition(".")
    return f"{stem}{suffix}{dot}{ext}"


def _final_name(name: str, prefix: str | None, suffix: str) -> str:
    """image.png -> image-1.png; with prefix "seed-3": image.png -> seed-3-1.png, depth.png -> seed-3-depth-1.png."""
    if prefix is None:
        return _with_suffix(name, suffix)
    stem, dot, ext = name.partition(".")
    return f"{prefix}{'' if stem == 'image' else '-' + stem}{suffix}{dot}{ext}"


def _check_prefix(prefix: str | None) -> None:
    if prefix is not None and (not prefix or prefix.startswith(".") or any(c in prefix for c in "/\\\0")):
        raise UserError(f"output name prefix {prefix!r} must be a plain file name (no folders)")


def _place_exclusive(src: Path, dst: Path) -> None:
    """Put src at dst, failing with FileExistsError instead of replacing a file that appeared meanwhile."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem
        with open(src, "rb") as fin, open(dst, "xb") as fout:
            shutil.copyfileobj(fin, fout)


_TEMP_PREFIX = ".threedis-"
STALE_AFTER_S = 24 * 3600  # a temp folder whose writer cannot be identified is removed after this long


def _writer_alive(name: str) -> bool | None:
    """.threedis-<pid>-xxxx -> whether that process still runs (None: the name carries no pid)."""
    pid_text = name[len(_TEMP_PREFIX):].partition("-")[0]
    if not pid_text.isdigit():
        return None
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's process) or cannot tell: leave it
    return True


def remove_stale_temp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that interrupted or killed writers left in `folder`; returns them.

    A folder is stale when the process named in it is gone, or (older layouts without a pid)
    when it has not changed for STALE_AFTER_S. A live writer's folder is never touched.
    """
    removed: list[Path] = []
    try:
        entries = list(Path(folder).glob(_TEMP_PREFIX + "*"))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            if entry.is_symlink():
                continue
            alive = _writer_alive(entry.name)
            if alive or (alive is None and now - entry.stat().st_mtime < STALE_AFTER_S):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError:
            continue
    return removed


def check_output_folder(out_dir: str | os.PathLike, need_bytes: int = 64 << 20) -> Path:
    """Fail now, before any model loads, if the outputs could not be written to `out_dir`.

    Creates the folder, proves it writable with a real file, and checks the free space
    (a render's files are a few MB at 1024^2; need_bytes leaves room for the temp copy).
    """
    out = make_folder(out_dir, "output folder", "choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=out, prefix=f"{_TEMP_PREFIX}{os.getpid()}-probe-")
        try:
            os.write(fd, b"threedis")
        finally:
            os.close(fd)
            os.unlink(probe)
        free = shutil.disk_usage(out).free
    except OSError as exc:
        raise UserError(f"cannot write to the output folder {out}: {folder_problem(out, exc)}; choose another --out") \
            from None
    if free < need_bytes:
        raise UserError(f"the output folder {out} has {free / 1e6:.0f} MB free; a render needs about "
                        f"{need_bytes / 1e6:.0f} MB: free some space or choose another --out")
    return out


def _place_set(staged: dict[str, Path], targets: dict[str, Path], overwrite: bool) -> None:
    """Move a staged set to its final names, all or nothing (an interrupt waits until it is done).

    An interrupt that came meanwhile is raised once the set is whole, carrying the set's
    paths (interrupts.mark_completed): the command says the set is complete and where.
    """
    from threedis.engine.interrupts import mark_completed, uninterruptible

    placed: list[Path] = []
    try:
        with uninterruptible():
            try:
                for kind, path in staged.items():
                    if overwrite:
                        os.replace(path, targets[kind])
                    else:
                        _place_exclusive(path, targets[kind])
                    placed.append(targets[kind])
            except BaseException:  # a clash, a full disk: take back what was placed, keep no half set
                if not overwrite:
                    for target in placed:
                        target.unlink(missing_ok=True)
                raise
    except KeyboardInterrupt as err:
        if len(placed) == len(staged):  # held during the move: the whole set is in place
            mark_completed(err, [f"{kind:<12} {target}" for kind, target in targets.items()])
        raise


def save_result(result: Any, out_dir: str | os.PathLike, overwrite: bool = False, pictures: bool = True,
                prefix: str | None = None) -> dict[str, Path]:
    """Write image.png (with metadata), depth.png, layout.png, masks, rule pictures and the report files.

    Returns kind -> final path. The set is written into a temporary folder beside the
    outputs and then moved in at once: it appears whole or not at all, also when the
    process is interrupted (the temporary folder is removed, or by the next save when the
    process was killed). Without overwrite, a name clash moves the whole set to the first
    free numbered suffix rather than replacing anything. prefix: see RenderResult.save.
    """
    _check_prefix(prefix)
    out = check_output_folder(out_dir, need_bytes=0)
    remove_stale_temp(out)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f"{_TEMP_PREFIX}{os.getpid()}-"))
    try:
        try:
            staged = _stage(result, tmp, pictures)
        except OSError as exc:
            raise UserError(f"cannot write the outputs to {out}: {exc.strerror or exc}; free some space or choose "
                            f"another folder") from None
        for n in range(100_000):
            suffix = f"-{n}" if n else ""
            targets = {kind: out / _final_name(path.name, prefix, suffix) for kind, path in staged.items()}
            if not overwrite and any(t.exists() for t in targets.values()):
                continue
            try:
                _place_set(staged, targets, overwrite)
                return targets
            except FileExistsError:  # another writer took a name meanwhile: try the next suffix
                continue
            except OSError as exc:
                raise UserError(f"cannot write the outputs to {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(f"no free output name in {out}; choose another folder")  # pragma: no cover


def save_image_new(image: Image.Image, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save `image` at `path`; an existing file is a UserError unless overwrite=True.

    Written to a temporary file first, then put in place, so a half-written file never
    appears under the final name and a file that appears meanwhile is not replaced.
    """
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{target} is a folder; give a file name such as {target / 'depth.png'}")
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists; choose another name or pass --overwrite")
    make_folder(target.parent, "folder", f"choose another place for {target.name}")
    remove_stale_temp(target.parent)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f"{_TEMP_PREFIX}{os.getpid()}-",
                               suffix=target.suffix or ".png")
    os.close(fd)
    try:
        try:
            image.save(tmp)  # format from the suffix (.png when the name has none)
        except (ValueError, OSError) as exc:
            raise UserError(f"cannot write {target}: {exc}; use a .png or .jpg name") from None
        if overwrite:
            os.replace(tmp, target)
        else:
            try:
                _place_exclusive(Path(tmp), target)
            except FileExistsError:
                raise UserError(f"{target} already exists; choose another name or pass --overwrite") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def open_appending(path: str | os.PathLike) -> IO[str]:
    """`path` opened to append JSON lines, on a fresh line: a last line torn by a crash or a full disk
    is ended first, so the next row is not glued to it (and lost with it). OSError propagates."""
    path = Path(path)
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
    handle = open(path, "a", encoding="utf-8")
    if torn:
        handle.write("\n")
    return handle


def replace_file(path: str | os.PathLike, data: bytes, what: str = "", mode: int = 0o666) -> Path:
    """Write `data` at `path`, replacing any file there, so that the name only ever holds a whole file.

    Written to a temporary name in the same folder, flushed to disk and renamed. The file
    gets `mode` less the umask (0644 usually, like the images a render saves; 0o600 for a
    secret, which is never readable by others, not even while it is written). A full,
    read-only or missing folder is one UserError naming the file.
    """
    target = Path(path)
    tmp = target.with_name(f"{_TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}-{target.name}")
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {what or target}: {exc.strerror or exc}; free some space, check the folder's "
                        f"permissions, or choose another folder") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def read_metadata(png_path: str | os.PathLike) -> dict:
    """The settings stored in an image written by save_result, checked key by key (threedis.engine.metadata)."""
    from threedis.engine.metadata import parse_metadata_text

    path = input_file(png_path, "image")
    try:
        with Image.open(path) as image:
            image.load()
            text = dict(getattr(image, "text", {}) or {}).get(METADATA_KEY)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if text is None:
        raise UserError(f"{path} has no threedis metadata; was it written by threedis (save_result)?")
    return parse_metadata_text(text)


def render_kwargs_from_metadata(meta: dict, depth: Any = None, base_dir: str | os.PathLike | None = None) -> dict:
    """Keyword arguments for Engine.render that reproduce the image the metadata came from.

    The depth map is not inside the PNG: pass the depth.png saved beside it (stage 1's
    settings are returned too, so without it the engine's stage 1 makes the depth again).
    SAM2 masks are remade from the depth when SAM ran (the engine needs its SAM2 model).
    The layout goes through the layout parser with its limits; relative mask paths in it
    resolve against base_dir (the image's folder).
    """
    from threedis.engine.options import RenderOptions
    from threedis.engine.layout import Layout
    from threedis.engine.metadata import parse_metadata
    from threedis.engine.stages import Stage1Options
    from threedis.kernels.rule import RuleError, Schedule

    meta = parse_metadata(meta)
    try:
        schedule = Schedule(**meta["schedule"])
    except (RuleError, TypeError) as exc:
        raise UserError(f"threedis metadata: schedule is not valid ({exc})") from None
    kwargs = {key: meta[key] for key in ("steps", "guidance")}
    kwargs.update(layout=Layout.from_dict(meta["layout"], base_dir=base_dir), seed=meta["seed"], schedule=schedule,
                  options=RenderOptions(**{key: meta[key] for key in _OPTION_KEYS}))
    if (meta.get("sam") or {}).get("ran"):
        kwargs["sam"] = True
    stage1 = meta.get("depth") or {}
    if stage1.get("source") == "stage1" and depth is None:
        fields = ("steps", "guidance", "seed", "migc_steps", "phase_augment", "size", "negative_prompt",
                  "refine_steps")
        kwargs["stage1"] = Stage1Options(**{k: stage1[k] for k in fields if stage1.get(k) is not None})
    if depth is not None:
        kwargs["depth"] = depth
    return kwargs


def _sibling(image_path: Path, name: str) -> Path:
    """The file of the same saved set: image-3.png -> depth-3.png (save_result's shared suffix)."""
    stem = image_path.name.partition(".")[0]
    if not stem.startswith("image"):  # a named set: seed-3.png -> seed-3-depth.png
        return image_path.with_name(_final_name(name, stem, ""))
    return image_path.with_name(_with_suffix(name, stem[len("image"):]))


@dataclass
class Rerender:
    """What reproduces a saved image: Engine.from_pretrained kwargs, LoRAs to load, Engine.render kwargs."""

    engine: dict
    loras: list[tuple[str, float]] = field(default_factory=list)
    render: dict = field(default_factory=dict)


def _reproducing_overrides(meta: dict) -> dict[str, str]:
    """Profile overrides pinning what changes the numbers: each model's weight format, the step cache and
    VAE tiling (so the profile "auto" picks on this machine still renders the same), plus the user's own."""
    out = {str(k): str(v) for k, v in (meta.get("overrides") or {}).items()}
    if "vae_tiling" in meta:
        out["vae_tiling"] = str(bool(meta["vae_tiling"])).lower()
    for key, place in (meta.get("placement") or {}).items():
        weights = str((place or {}).get("weights") or "").removeprefix("given ").strip()
        if weights:
            out[f"{key}.weights"] = weights
    cache = meta.get("step_cache") or {}
    if cache.get("kind"):
        out["step_cache"] = str(cache["kind"])
        if cache.get("threshold") is not None:
            out["step_cache_threshold"] = str(cache["threshold"])
    return out


def _saved_file(image: Path, folder: Path, name: str) -> Path | None:
    """The file `name` of the image's saved set (same suffix), or None when there is none.

    One rule for every file `render --from` reads beside an image: it must be a regular
    file inside the image's folder once links are followed. A link to a file elsewhere (a
    depth.png pointing at ~/.ssh/id_rsa.png, say) is refused, never read.
    """
    saved = _sibling(image, name)
    if not saved.exists() and not saved.is_symlink():
        return None
    if inside(folder, saved) is None:
        raise UserError(f"{image}: {saved.name} beside it links to {os.path.realpath(saved)}, outside the image's "
                        f"folder; files of a saved set are read only from its folder: copy the file there, or pass "
                        f"it explicitly")
    problem = file_problem(saved)
    if problem is not None:
        raise UserError(f"{image}: {saved.name} beside it: {problem}; replace it with the file the set was saved with")
    return saved.resolve()


def rerender_from_png(png_path: str | os.PathLike, depth: Any = None, replace_loras: bool = False) -> Rerender:
    """Everything needed to render the image at `png_path` again, from its metadata and the files beside it.

    The depth map is the depth file saved beside the image (same suffix) unless `depth`
    is given; without either, a depth made by stage 1 is made again from the recorded
    stage-1 settings. User masks are the mask files saved beside the image; a path in the
    metadata is never opened (it could name any image on the machine). LoRA files must be
    inside the image's folder, unless replace_loras (the caller gives the LoRAs again). The weight formats and
    step cache are pinned from the metadata, so the profile "auto" picks on this machine
    does not change the picture. Model, stage-1 and SAM ids come from the metadata: the
    caller decides whether they may be downloaded (the CLI: only with --allow-downloads).
    """
    path = Path(png_path)
    folder = path.resolve().parent
    meta = read_metadata(path)
    source = (meta.get("depth") or {}).get("source")
    if depth is None:
        depth = _saved_file(path, folder, "depth.png")
    if depth is None and source != "stage1":
        raise UserError(f"{path}: the depth map it was rendered from ({_sibling(path, 'depth.png').name}, saved "
                        f"beside it) is missing; pass it (--depth FILE, or depth=...)")
    layout = dict(meta["layout"])
    instances = layout.get("instances")
    if isinstance(instances, list):
        instances = [dict(item) if isinstance(item, dict) else item for item in instances]
        origins = meta.get("masks") or []
        for i, item in enumerate(instances):
            if not isinstance(item, dict) or "mask" not in item:
                continue
            saved = _saved_file(path, folder, f"mask-{i}.png")
            if i < len(origins) and origins[i] == "user" and saved is not None:
                item["mask"] = str(saved)
            else:
                raise UserError(f"{path}: instance {i} was rendered with a user mask, and "
                                f"{_sibling(path, f'mask-{i}.png').name} is not beside the image; masks named in the "
                                f"metadata are never opened")
        layout["instances"] = instances
    # with the saved depth, stage 1 (and its settings) is not needed again
    render = render_kwargs_from_metadata({**meta, "layout": layout}, depth=depth, base_dir=folder)
    # "auto": the recorded profile may not fit (or exist on) this machine; the overrides pin its numerics
    engine = {"path_or_id": meta.get("model"), "profile": "auto",
              "overrides": _reproducing_overrides(meta), "backend": meta.get("backend") or "auto"}
    if depth is None:
        engine["stage1"] = meta["depth"].get("model")
    if render.get("sam"):
        engine["sam"] = (meta.get("sam") or {}).get("model")
    loras = []
    for item in [] if replace_loras else meta.get("loras") or []:
        lora = Path(item["path"])
        lora = lora if lora.is_absolute() else folder / lora
        if inside(folder, lora) is None:
            raise UserError(f"{path} was rendered with the LoRA {item['path']}, outside the image's folder; copy it "
                            f"beside the image, or give it again (--lora FILE --lora-scale {item.get('scale', 1.0)})")
        loras.append((str(lora), float(item.get("scale", 1.0))))
    return Rerender(engine=engine, loras=loras, render=render)
