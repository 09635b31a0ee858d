"""On-policy reverse-KL distillation (MiniLLM's single-step term): the student writes, the teacher grades.

At every step the batch's calibration windows are cut to their first seq_len // 2 tokens (the prompts); the
student continues each prompt to seq_len tokens, sampling at `rollout_temperature` (seeded, KV cache, no
grad); the teacher scores those windows; the loss is the token-level reverse KL

    KL(student || teacher) = sum_v p_s(v) (log p_s(v) - log p_t(v))

over the whole vocabulary at each position whose next token the student sampled, averaged over them.
Mode-seeking: the student is pushed off what the teacher finds unlikely rather than asked to spread its
mass over everything the teacher allows, which a small student cannot model. With kd_weight < 1, the
remaining weight is next-token cross-entropy on the unchanged calibration windows (MiniLLM's pre-training
LM loss).

What this is: GKD (Agarwal et al., 2024) with beta = 1 and only on-policy data, which is also the
per-token "single-step" part of MiniLLM's gradient (Gu et al., 2024). What it is not: MiniLLM's long-horizon
policy-gradient term (the reward of the continuation's later tokens), its teacher-mixed sampling (rollouts
drawn from a mix of teacher and student) and its length normalisation are not built; neither is a
temperature on the loss (the distributions are compared unsoftened, as MiniLLM does).
"""

from __future__ import annotations

import time

from farm.compress.kd import sample


def reverse_kl(student_logits, teacher_logits):
    """Mean over positions of KL(student || teacher) over the vocabulary; logits [..., vocab]. The gradient
    flows to the student's logits only: the teacher's are detached."""
    import torch.nn.functional as F

    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    return (log_s.exp() * (log_s - log_t)).sum(-1).mean()


def rollouts(student, prompts, new_tokens: int, temperature: float, generator):
    """prompts [batch, p] -> [batch, p + new_tokens]: each prompt continued by the student, sampled at
    `temperature` (greedy at 0) with its KV cache, without grad. The student is left in the mode it was in."""
    import torch

    was_training = student.training
    student.eval()
    with torch.no_grad():  # not inference_mode: the windows are the input of a forward pass that trains
        ids = sample(student, prompts, new_tokens, temperature, generator)
    student.train(was_training)
    return ids


class OnPolicy:
    """One step's loss for the training loop (farm/compress/kd.py), and the time its sampling took."""

    def __init__(self, teacher, seq_len: int, temperature: float, kd_weight: float, seed: int):
        import torch

        self.teacher, self.kd_weight, self.temperature = teacher, kd_weight, temperature
        self.prompt_len = seq_len // 2
        self.new_tokens = seq_len - self.prompt_len
        self.generator = torch.Generator().manual_seed(seed)
        self.sampling_seconds = 0.0

    def loss(self, student, ids):
        """ids [batch, seq_len]: calibration windows. Their prompts are continued by the student; the loss is
        kd_weight * reverse KL on those continuations + (1 - kd_weight) * cross-entropy on `ids` themselves."""
        import torch

        from farm.compress.kd import ce_loss

        t0 = time.time()
        rolled = rollouts(student, ids[:, :self.prompt_len], self.new_tokens, self.temperature, self.generator)
        self.sampling_seconds += time.time() - t0
        p = self.prompt_len
        logits = student(rolled, use_cache=False).logits[:, p - 1:-1]  # the positions that chose a new token
        with torch.no_grad():
            ref = self.teacher(rolled, use_cache=False).logits[:, p - 1:-1]
        loss = self.kd_weight * reverse_kl(logits, ref)
        if self.kd_weight < 1:
            loss = loss + (1 - self.kd_weight) * ce_loss(student(ids, use_cache=False).logits, ids)
        return loss

    def info(self, total_seconds: float, batch: int) -> dict:
        return {"objective": "reverse_kl", "rollout_tokens_per_step": batch * self.new_tokens,
                "sampling_seconds": round(self.sampling_seconds, 1),
                "update_seconds": round(total_seconds - self.sampling_seconds, 1)}
