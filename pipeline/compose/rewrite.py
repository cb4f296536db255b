"""Instruction rewriting (`--rewriter vllm`): an LLM turns the grammar-joined complex instruction
into fluent, varied English (Complex-Edit's compound rewrite), and nothing may get lost.

Runs after the composer. Per sample one chat-completions request (text only, through the shared
`pipeline.clients.openai.OpenAIClient`) gives the numbered sub-instructions and the grammar text;
the answer, constrained by a JSON schema, is the new instruction and, per sub-instruction in
order, the span of it that says that sub-instruction. It is accepted only when every span occurs
in the instruction, the spans do not overlap, and each span names its sub-instruction's target
and attributes (`required_terms`: the referring phrase's content words, the colour, label,
direction, size word, word to write, pattern or background operation). Anything else (a dropped
or changed target or attribute, an unreachable server, the breaker open) is refused: the sample
keeps the grammar text and goes on — a rewrite is never a reason to lose a sample.

Both texts are stored: `sample.instruction` holds the one used (the rewrite when accepted) and
`provenance["rewrite"]` = {"status": "accepted" | "refused", "grammar": the grammar text,
"by": "vllm:<model>@<prompt version>", "reason": why refused}.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pipeline.clients.openai import (BadAnswer, Call, CallFailed, ClientConfig, OpenAIClient,
                                     options_signature)
from pipeline.record import EditSample, SubEdit
from pipeline.registry import Registry
from pipeline.stage import RecordStage

log = logging.getLogger(__name__)

PROMPT_VERSION = "rewrite-v1"
STOPWORDS = {"the", "a", "an", "in", "on", "of", "at", "to", "and", "with", "its", "it", "one",
             "that", "is", "from", "into", "by", "for"}
PARAM_TERMS = {  # per edit type, the params whose values a rewrite must keep
    "recolor": ("to_color",), "add": ("label", "color"), "replace": ("to_label", "to_color"),
    "move": ("direction",), "resize": ("to_size",), "add_text": ("text", "color"),
    "texture": ("to_pattern",), "background": ("to_color",), "remove": (), "swap": (),
}
BACKGROUND_OPS = {"blur": "blur", "desaturate": "", "tint": "", "photo": ""}

SYSTEM_PROMPT = (
    "You rewrite image-editing instructions. Given several sub-instructions joined mechanically, "
    "write ONE fluent, natural English instruction that a person might type, varying the wording "
    "and the sentence structure. Keep every sub-instruction, in the same order, with exactly the "
    "same objects, colours, labels, directions, sizes, words and patterns: never drop, merge, "
    "add or change one. Answer with JSON only."
)

REWRITERS: Registry[RecordStage] = Registry("rewriter", ("pipeline.compose.rewrite",))


def normalise(text: str) -> str:
    return " " + " ".join(re.sub(r"[^a-z0-9']+", " ", text.lower()).split()) + " "


def required_terms(sub: SubEdit) -> list[str]:
    """What a rewrite of this sub-instruction must still say (normalised words or phrases)."""
    terms = [w for w in normalise(sub.target).split() if w not in STOPWORDS]
    for key in PARAM_TERMS.get(sub.type, ()):
        value = sub.params.get(key)
        if isinstance(value, str) and value.strip():
            terms.append(normalise(value).strip())
    if sub.type == "background" and BACKGROUND_OPS.get(sub.params.get("op", "")):
        terms.append(BACKGROUND_OPS[sub.params["op"]])
    seen, out = set(), []
    for term in terms:
        if term and term not in seen:
            seen.add(term)
            out.append(term)
    return out


def answer_schema(n: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "instruction": {"type": "string", "minLength": 1, "maxLength": 1200},
            "parts": {"type": "array", "minItems": n, "maxItems": n,
                      "items": {"type": "string", "minLength": 1, "maxLength": 400}},
        },
        "required": ["instruction", "parts"],
        "additionalProperties": False,
    }


def check_rewrite(answer: dict[str, Any], sub_edits: list[SubEdit]) -> str:
    """The accepted instruction, or BadAnswer naming the first thing the rewrite lost."""
    text = " ".join(answer["instruction"].split())
    if "\n" in answer["instruction"].strip() or len(text) < 3:
        raise BadAnswer("the rewrite is not one instruction")
    start = 0
    for number, (part, sub) in enumerate(zip(answer["parts"], sub_edits), start=1):
        part = " ".join(part.split())
        at = text.lower().find(part.lower(), start)
        if at < 0:
            raise BadAnswer(f"sub-instruction {number}: its span {part[:60]!r} is not in the "
                            "rewrite, in order")
        start = at + len(part)
        words = normalise(part)
        missing = [t for t in required_terms(sub) if f" {t} " not in words]
        if missing:
            raise BadAnswer(f"sub-instruction {number} ({sub.text!r}) lost {missing[0]!r}")
    return text


def user_text(sample: EditSample) -> str:
    lines = [f'Mechanical instruction: "{sample.instruction}"', "", "Sub-instructions, in order:"]
    for number, sub in enumerate(sample.sub_edits, start=1):
        keep = ", ".join(required_terms(sub))
        lines.append(f"{number}. {sub.text} (keep: {keep})")
    lines += ["", 'Answer {"instruction": the rewrite, "parts": for each sub-instruction in order, '
              "the exact span of your rewrite that says it}."]
    return "\n".join(lines)


@dataclass(frozen=True)
class RewriterConfig(ClientConfig):
    WHAT = "vllm rewriter"

    max_tokens: int = 0  # 0: sized from the number of sub-instructions
    temperature: float = 0.7  # fluent and varied: sampled, with the build's seed per sample

    def __post_init__(self) -> None:
        super().__post_init__()
        self._int_in("max_tokens", 0, 100_000)
        self._require(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 2,
                      f"temperature must be within 0..2, got {self.temperature!r}")


class VllmRewriter(RecordStage):
    name = "rewrite"

    def __init__(self, config: RewriterConfig):
        self.config = config
        self.client = OpenAIClient(config.client_config())
        self.by = f"vllm:{config.model}@{PROMPT_VERSION}"

    def __reduce__(self):
        return (self.__class__, (self.config,))

    def call(self, sample: EditSample) -> Call:
        subs = list(sample.sub_edits)

        def build() -> dict[str, Any]:
            # varied wording: sampled, yet reproducible (the seed depends on the sample)
            return {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                 {"role": "user", "content": user_text(sample)}]}

        return Call(key=f"rewrite {sample.id}", build=build, schema=answer_schema(len(subs)),
                    schema_name="instruction_rewrite",
                    max_tokens=self.config.max_tokens or 120 + 80 * len(subs),
                    parse=lambda answer: check_rewrite(answer, subs),
                    first_sampling={"temperature": self.config.temperature,
                                    "seed": (self.config.seed * 1_000_003 + sample.index) % 2**63})

    def __call__(self, batch: list[EditSample]) -> list[EditSample]:
        ready = [s for s in batch if not s.failed and s.sub_edits and s.instruction]
        if not ready:
            return batch
        for sample, result in zip(ready, self.client.run([self.call(s) for s in ready])):
            record = {"grammar": sample.instruction, "by": self.by}
            if isinstance(result, CallFailed):
                record.update(status="refused", reason=str(result)[:300])
            else:
                record["status"] = "accepted"
                sample.instruction = result
            sample.provenance["rewrite"] = record
        return batch

    def close(self) -> None:
        self.client.close()


def make_vllm_rewriter(**options: Any) -> VllmRewriter:
    """`--rewriter vllm --rewriter-option url=... --rewriter-option model=...`."""
    return VllmRewriter(RewriterConfig.from_options(**options))


make_vllm_rewriter.__signature__ = options_signature(RewriterConfig)
REWRITERS.register("vllm")(make_vllm_rewriter)
