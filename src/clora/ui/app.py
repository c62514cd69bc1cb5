"""The Gradio page of ``clora ui``: the form of ``clora.ui.form`` laid out, wired to ``clora.ui.runner``.

Every callback turns a ``CLoRAError`` (bad input) into a message in the page's status line; any
other exception is logged on the server's terminal and shown as one line, and the server goes on.
"""

from __future__ import annotations

import functools
import random
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import CLoRAError, one_line
from . import form as F
from .runner import Cancelled, Runner, maps_picture

LORA_TYPES = [".safetensors", ".ckpt", ".pt", ".bin"]
CSS = "#clora-problems li, #clora-problems p { color: #b91c1c; }"


def _status(text: str, error: bool = False) -> str:
    return f"**{'Error' if error else 'Status'}:** {text}" if text else ""


def _safely(fn: Callable[..., Any], on_error: Callable[[str], Any]) -> Callable[..., Any]:
    """``fn`` with bad input and bugs turned into ``on_error(message)``: no traceback in the page."""

    @functools.wraps(fn)  # Gradio reads the signature (progress=, request:) through __wrapped__
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CLoRAError as exc:
            return on_error(F.message(exc))
        except Exception as exc:  # noqa: BLE001 - the server must keep serving
            traceback.print_exc(file=sys.stderr)
            return on_error(f"internal error: {one_line(exc)} (details on the server's terminal)")

    return wrapped


class Page:
    """The components of the page and the conversions between their values and the form's data."""

    def __init__(self, initial: dict[str, Any]) -> None:
        gr.Markdown(
            "# CLoRA: compose LoRAs\nEach concept LoRA gets its own prompt; a contrastive update keeps their "
            "attention apart and masks cut from it fuse the results. Opens with the bundled demo model."
        )
        with gr.Row():
            self.model = gr.Textbox(
                label="model (diffusers folder, hub id or .safetensors checkpoint)", value=initial["model"], scale=4
            )
            self.restore = gr.File(
                label="drop a PNG made by clora to restore its settings",
                file_types=[".png"],
                elem_id="clora-restore",
                scale=2,
            )
        self.prompt = gr.Textbox(label="prompt", value=initial["prompt"], lines=2, elem_id="clora-prompt")
        self.highlighted = gr.HighlightedText(label="concepts in the prompt", show_legend=True, combine_adjacent=True)
        self.problems = gr.Markdown(elem_id="clora-problems")
        with gr.Accordion("token positions (as --dry-run shows them)", open=True):
            self.tokens = gr.Markdown(elem_id="clora-tokens")

        self.concept_count = gr.State(len(initial["concepts"]))
        self.concept_groups, self.concepts = [], []
        gr.Markdown("### Concepts (one LoRA each)")
        for i in range(F.MAX_CONCEPTS):
            row = initial["concepts"][i] if i < len(initial["concepts"]) else {}
            with gr.Group(visible=i < len(initial["concepts"])) as group:
                with gr.Row():
                    upload = gr.UploadButton("upload LoRA", file_types=LORA_TYPES, scale=1)
                    fields = {
                        "lora": gr.Textbox(label=f"concept {i + 1}: LoRA file", value=row.get("lora", ""), scale=4),
                        "phrase": gr.Textbox(
                            label="phrase (words of the prompt)",
                            value=row.get("phrase", ""),
                            scale=2,
                            elem_id=f"clora-phrase-{i}",
                        ),
                        "trigger": gr.Textbox(
                            label="trigger (replaces the phrase)", value=row.get("trigger", ""), scale=2
                        ),
                        "weight": gr.Number(label="weight", value=row.get("weight", 1.0), scale=1, minimum=0),
                    }
                    remove = gr.Button("remove", scale=1, size="sm")
            fields["upload"], fields["remove"] = upload, remove
            self.concept_groups.append(group)
            self.concepts.append(fields)
        self.add_concept = gr.Button("add a concept", size="sm")

        self.style_count = gr.State(len(initial["styles"]))
        self.style_groups, self.styles = [], []
        with gr.Accordion("style LoRAs (applied to every concept's branch)", open=bool(initial["styles"])):
            for i in range(F.MAX_STYLES):
                row = initial["styles"][i] if i < len(initial["styles"]) else {}
                with gr.Group(visible=i < len(initial["styles"])) as group:
                    with gr.Row():
                        upload = gr.UploadButton("upload LoRA", file_types=LORA_TYPES, scale=1)
                        fields = {
                            "lora": gr.Textbox(label=f"style {i + 1}: LoRA file", value=row.get("lora", ""), scale=4),
                            "weight": gr.Number(label="weight", value=row.get("weight", 0.8), scale=1),
                        }
                        remove = gr.Button("remove", scale=1, size="sm")
                fields["upload"], fields["remove"] = upload, remove
                self.style_groups.append(group)
                self.styles.append(fields)
            self.add_style = gr.Button("add a style LoRA", size="sm")

        with gr.Row():
            # (text, not a Number: seeds go up to 2**64-1, past what a browser's numbers hold exactly; and no
            # precision=0 on any Number: in Gradio 6.31 a typed value then snaps back when the box is an input)
            self.seed = gr.Textbox(label="seed (0 .. 2**64-1)", value=str(initial["seed"]), elem_id="clora-seed")
            self.random_seed = gr.Checkbox(label="random seed", value=False)
            self.num_images = gr.Slider(
                1, 8, value=1, step=1, label="number of images (one batch: seeds seed, seed+1, ...)"
            )
            self.with_merged = gr.Checkbox(label="also the same seed with the LoRAs merged", value=False)
        with gr.Accordion("advanced (every other spec key; empty = default)", open=False, elem_id="clora-advanced"):
            self.advanced = {}
            for f in F.ADVANCED:
                self.advanced[f.key] = _field_component(f, initial["advanced"].get(f.key))
        self.pinned = gr.State(initial.get("pinned"))

        with gr.Row():
            self.generate = gr.Button("Generate", variant="primary", elem_id="clora-generate")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="clora-cancel")
        self.status = gr.Markdown(elem_id="clora-status")
        with gr.Row():
            self.images = gr.Gallery(label="images", columns=2, elem_id="clora-images", format="png")
            self.merged = gr.Gallery(label="LoRAs merged (same seed)", columns=2, elem_id="clora-merged", format="png")
        self.maps = gr.Image(label="attention maps (top) and masks (bottom)", type="pil", elem_id="clora-maps")
        with gr.Row():
            self.map_image = gr.Number(label="maps of image number", value=1, minimum=1)
            # (Gradio wants maximum > minimum: a 1-step run still shows a 1..2 slider; step 2 shows step 1)
            self.map_step = gr.Slider(1, 2, value=1, step=1, label="denoising step", elem_id="clora-step")
        self.downloads = gr.File(label="downloads: PNGs with their spec, and the spec as YAML", file_count="multiple")
        self.run = gr.State(None)

    # -- values <-> data ---------------------------------------------------------------------

    def inputs(self) -> list[Any]:
        rows = [c[k] for c in self.concepts for k in F.CONCEPT_FIELDS] + [
            s[k] for s in self.styles for k in F.STYLE_FIELDS
        ]
        return [
            self.model,
            self.prompt,
            self.concept_count,
            self.style_count,
            *rows,
            self.seed,
            *self.advanced.values(),
            self.pinned,
        ]

    def data(self, values: list[Any]) -> dict[str, Any]:
        """Spec data from ``inputs()``' values, in that order."""
        model, prompt, n_concepts, n_styles, *rest = values
        concepts, rest = _rows(rest, F.MAX_CONCEPTS, F.CONCEPT_FIELDS)
        styles, rest = _rows(rest, F.MAX_STYLES, F.STYLE_FIELDS)
        seed, *rest = rest
        advanced = dict(zip(self.advanced, rest[: len(self.advanced)]))
        pinned = rest[len(self.advanced)]
        return F.spec_data(model, prompt, concepts[:n_concepts], styles[:n_styles], seed, advanced, pinned)

    def form_outputs(self) -> list[Any]:
        """What a restored PNG sets: every input, and which rows show."""
        return [*self.inputs(), *self.concept_groups, *self.style_groups]

    def form_values(self, form: dict[str, Any]) -> list[Any]:
        """Values for ``form_outputs()`` that show ``form`` (from ``form.form_from_png``)."""
        concept_rows = _padded(form["concepts"], F.MAX_CONCEPTS, F.EMPTY_CONCEPT)
        style_rows = _padded(form["styles"], F.MAX_STYLES, F.EMPTY_STYLE)
        n, m = len(form["concepts"]), len(form["styles"])
        return [
            form["model"],
            form["prompt"],
            n,
            m,
            *[row[k] for row in concept_rows for k in F.CONCEPT_FIELDS],
            *[row[k] for row in style_rows for k in F.STYLE_FIELDS],
            str(form["seed"]),
            *[form["advanced"].get(k) for k in self.advanced],
            form.get("pinned"),
            *[gr.update(visible=i < n) for i in range(F.MAX_CONCEPTS)],
            *[gr.update(visible=i < m) for i in range(F.MAX_STYLES)],
        ]


def _rows(values: list[Any], count: int, keys: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[Any]]:
    size = count * len(keys)
    flat, rest = values[:size], values[size:]
    return [dict(zip(keys, flat[i : i + len(keys)])) for i in range(0, size, len(keys))], rest


def _padded(rows: list[dict[str, Any]], count: int, empty: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(empty, **row) for row in rows] + [dict(empty) for _ in range(count - len(rows))]


def _field_component(f: F.Field, value: Any) -> Any:
    shown = F.field_value(f, f.default if value is None else value)
    common = {"label": f.label, "info": f.help, "elem_id": "clora-" + f.key.replace("_", "-")}
    if f.kind == "bool":
        return gr.Checkbox(value=bool(shown), **common)
    if f.kind == "choice":
        return gr.Dropdown(list(f.choices), value=shown, **common)
    if f.kind == "choices":
        return gr.CheckboxGroup(list(f.choices), value=shown or [], **common)
    if f.kind in ("int", "float"):
        return gr.Number(value=shown, **common)
    return gr.Textbox(value=shown, **common)


def build_app(runner: Runner, initial: dict[str, Any] | None = None) -> gr.Blocks:
    """The page, wired; ``initial`` form values (default: the bundled demo composition)."""
    with gr.Blocks(title="CLoRA") as app:
        page = Page(initial or F.demo_form())
        _wire_preview(app, page)
        for rows, groups, count, add, empty in (
            (page.concepts, page.concept_groups, page.concept_count, page.add_concept, F.EMPTY_CONCEPT),
            (page.styles, page.style_groups, page.style_count, page.add_style, F.EMPTY_STYLE),
        ):
            _wire_rows(rows, groups, count, add, empty)
        _wire_restore(page)
        _wire_generate(page, runner)
    return app


def _wire_preview(app: gr.Blocks, page: Page) -> None:
    """Highlighted phrases, token positions and problems, redone whenever the words change."""

    def show_preview(*values: Any) -> tuple[Any, str, str]:
        result = F.preview(page.data(list(values)))
        return result.highlighted, result.table, "\n".join(f"- {p}" for p in result.problems)

    watched = [page.model, page.prompt, *[c[k] for c in page.concepts for k in ("lora", "phrase", "trigger")]]
    gr.on(
        [w.change for w in watched] + [page.add_concept.click, app.load],
        _safely(show_preview, lambda m: ([], "", f"- {m}")),
        inputs=page.inputs(),
        outputs=[page.highlighted, page.tokens, page.problems],
        queue=False,
    )


def _wire_rows(rows: list[dict[str, Any]], groups: list[Any], count: Any, add: Any, empty: dict[str, Any]) -> None:
    """Add and remove buttons of the concept (or style) rows; a LoRA file suggests its trigger."""
    keys, shown = tuple(empty), len(groups)

    def add_row(n: int) -> tuple[Any, ...]:
        n = min(n + 1, shown)
        return (n, *[gr.update(visible=i < n) for i in range(shown)])

    add.click(add_row, inputs=count, outputs=[count, *groups], queue=False)
    flat = [row[k] for row in rows for k in keys]
    for i, fields in enumerate(rows):
        trigger = fields.get("trigger")
        fields["upload"].upload(
            _safely(_uploaded, lambda m: (gr.update(), gr.update())),
            inputs=[fields["upload"], trigger or fields["lora"]],
            outputs=[fields["lora"], trigger or fields["lora"]],
            queue=False,
        )
        if trigger is not None:
            fields["lora"].blur(_suggest, inputs=[fields["lora"], trigger], outputs=trigger, queue=False)
        fields["remove"].click(
            functools.partial(_remove_row, i, keys=keys, empty=empty),
            inputs=[count, *flat],
            outputs=[count, *flat, *groups],
            queue=False,
        )


def _wire_restore(page: Page) -> None:
    """A PNG dropped on the page puts its settings in the form."""

    def restore(path: str) -> list[Any]:
        return [*page.form_values(F.form_from_png(path)), _status(f"settings restored from {Path(path).name}")]

    page.restore.upload(
        _safely(restore, lambda m: [gr.update()] * len(page.form_outputs()) + [_status(m, error=True)]),
        inputs=page.restore,
        outputs=[*page.form_outputs(), page.status],
        queue=False,
    )


def _wire_generate(page: Page, runner: Runner) -> None:
    """Generate (queued, one at a time, with progress), Cancel, and the maps' image and step controls."""
    running: dict[str, threading.Event] = {}  # browser session -> the cancel flag of its run
    outputs = [page.images, page.merged, page.maps, page.map_image, page.map_step, page.downloads, page.run]
    outputs += [page.seed, page.status]
    unchanged = [gr.update()] * (len(outputs) - 1)

    inputs = [*page.inputs(), page.random_seed, page.num_images, page.with_merged]

    # (the values come as one dict: Gradio passes the request only to a function without *args)
    def generate(values: dict, progress: gr.Progress = gr.Progress(), request: gr.Request = None) -> list[Any]:
        *form_values, random_seed, num_images, with_merged = [values[component] for component in inputs]
        data = page.data(form_values)
        if random_seed:
            data["seed"] = random.randrange(2**32)
        spec = F.build_spec(data)
        cancel = running[_session(request)] = threading.Event()
        progress(0, desc="loading the model and LoRAs")
        try:
            run = runner.generate(
                spec,
                int(num_images),
                bool(with_merged),
                progress=lambda done, total, what: progress((done, total), desc=what, unit="steps"),
                cancel=cancel,
            )
        except Cancelled as exc:
            return [*unchanged, _status(str(exc))]
        finally:
            running.pop(_session(request), None)
        steps = run.output.spec.steps  # the model family's count when the form left it empty
        maps = maps_picture(run, 0, steps) if spec.method == "clora" else None
        note = "" if spec.method == "clora" else f" (method {spec.method} cuts no masks: no maps)"
        done = _status(f"done: {len(run.images)} image(s) from seed {spec.seed}{note}")
        step = gr.update(maximum=max(2, steps), value=steps)
        images, merged = [str(p) for p in run.images], [str(p) for p in run.merged]
        return [images, merged, maps, 1, step, run.downloads, run, str(spec.seed), done]

    page.generate.click(
        _safely(generate, lambda m: [*unchanged, _status(m, error=True)]),
        inputs=set(inputs),
        outputs=outputs,
        concurrency_limit=1,
        show_progress_on=page.images,  # one progress bar, where the images will appear
    )

    def cancel(request: gr.Request = None) -> None:
        flag = running.get(_session(request))
        if flag is not None:  # the run's own reply then says it was cancelled
            flag.set()

    # (no output: a reply of this unqueued event to the status line could hide the run's later reply)
    page.cancel.click(cancel, queue=False)

    def show_maps(run: Any, image: float, step: float) -> Any:
        if run is None or run.output is None or run.output.spec.method != "clora":
            return gr.update()
        return maps_picture(run, max(1, min(int(image or 1), len(run.images))) - 1, int(step))

    gr.on(
        [page.map_image.change, page.map_step.release],
        _safely(show_maps, lambda m: gr.update()),
        inputs=[page.run, page.map_image, page.map_step],
        outputs=page.maps,
        queue=False,
    )


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def _uploaded(file: Any, trigger: str) -> tuple[str, str]:
    path = file if isinstance(file, str) else getattr(file, "name", str(file))
    suggestion = F.suggested_trigger(path) if not (trigger or "").strip() else None
    return path, (suggestion or trigger)


def _suggest(path: str, trigger: str) -> Any:
    if (trigger or "").strip() or not (path or "").strip():
        return gr.update()
    return F.suggested_trigger(path.strip()) or gr.update()


def _remove_row(i: int, count: int, *values: Any, keys: tuple[str, ...], empty: dict[str, Any]) -> list[Any]:
    count, values = F.remove_row(i, count, values, keys, empty)
    return [count, *values, *[gr.update(visible=r < count) for r in range(len(values) // len(keys))]]


def serve(runner: Runner, host: str, port: int, initial: dict[str, Any] | None = None, block: bool = True) -> Any:
    """Start the app; print its address. ``block=False`` returns the running app (tests)."""
    app = build_app(runner, initial)
    app.queue(default_concurrency_limit=1)
    app.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        show_error=False,
        quiet=True,
        inbrowser=False,
        css=CSS,
        allowed_paths=[str(runner.output_root)],
    )
    print(f"clora ui: serving on http://{'[' + host + ']' if ':' in host else host}:{port}", flush=True)
    if block:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        finally:
            app.close()
    return app
