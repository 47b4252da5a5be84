"""A tiny MASM training run under accelerate, used by the layer-mask tests (not a test module).

python train_script.py OUT [--steps N] [--stop_after N] [--resume] [--accumulation A] [--loop plain|explicit]
The global batch per optimizer step is always 8 samples (split over processes and accumulation).
--loop plain: a PEFT user's accelerate loop with no MASM call (step_hooks on); explicit (default): the loop
calls the regularisers and the layer mask itself, with step_hooks=False.
"""

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import get_peft_model
from transformers import ViTConfig, ViTForImageClassification

import peft_masm

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=8)
parser.add_argument("--stop_after", type=int, default=None)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--accumulation", type=int, default=1)
parser.add_argument("--granularity", default="layer")
parser.add_argument("--loop", choices=["plain", "explicit"], default="explicit")
args = parser.parse_args()
out = Path(args.out)

accelerator = Accelerator(gradient_accumulation_steps=args.accumulation, cpu=True)
set_seed(0)
sizes = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=48,
    image_size=32,
    patch_size=8,
)
model = ViTForImageClassification(ViTConfig(**sizes, num_labels=2))
config = peft_masm.MASMConfig(
    num_subspaces=2,
    subspace_rank=2,
    modules_to_save=["classifier"],
    mask_warmup=2,
    mask_interval=2,
    mask_keep_ratio=0.5,
    mask_granularity=args.granularity,
    layer_mask="dynamic",
    orthogonality_weight=0.01,
    spectral_weight=0.01,
    step_hooks=args.loop == "plain",
)
model = get_peft_model(model, config)
model.base_model.decompose()  # once, before wrapping, identically on every process
controller = model.base_model.layer_mask
optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=5e-4)

generator = torch.Generator().manual_seed(1)
pixels = torch.randn(8 * args.steps, 3, 32, 32, generator=generator)
labels = torch.randint(0, 2, (8 * args.steps,), generator=generator)
dataset = torch.utils.data.TensorDataset(pixels, labels)
per_device = 8 // (accelerator.num_processes * args.accumulation)
loader = torch.utils.data.DataLoader(dataset, batch_size=per_device, shuffle=False)

model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
accelerator.register_for_checkpointing(controller)
accelerator.register_for_checkpointing(accelerator.unwrap_model(model).base_model.step_state)
start_step = 0
if args.resume:
    accelerator.load_state(str(out / "state"))
    start_step = int((out / "state" / "step.txt").read_text())

step = 0
masm = accelerator.unwrap_model(model).base_model
for x, y in loader:
    with accelerator.accumulate(model):
        if step >= start_step:
            loss = model(pixel_values=x, labels=y).loss
            if args.loop == "explicit":
                loss = loss + masm.regularization_loss()["total"]
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.loop == "explicit":
                masm.update_layer_mask()
            optimizer.step()
            if accelerator.sync_gradients and args.loop == "explicit":
                masm.apply_fit_bound()
            optimizer.zero_grad()
    if accelerator.sync_gradients:
        step += 1
        if args.stop_after is not None and step == args.stop_after:
            accelerator.save_state(str(out / "state"))
            if accelerator.is_main_process:
                (out / "state" / "step.txt").write_text(str(step))
            accelerator.wait_for_everyone()
            sys.exit(0)

state = {
    n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad
}
state.update({n: b.clone() for n, b in accelerator.unwrap_model(model).named_buffers() if "masm_mask" in n})
state["history"] = torch.tensor(controller.history_masks)
state["history_steps"] = torch.tensor(controller.history_steps)
state["num_steps"] = torch.tensor(masm.step_state.num_steps)
torch.save(state, out / f"final_rank{accelerator.process_index}.pt")
