"""Part 10 exercises: the geometry, the tokenization and the metrics behind the chapter's lessons.

Replace each `raise NotImplementedError` with your code, then run
    pytest tests/test_part10_exercises.py -rs
Untouched stubs are skipped ("not attempted yet"); a filled-in one passes or says what is off.
Each check compares your function with an outside reference: geoopt's Poincaré ball (distance, Möbius
addition, Riemannian gradient) and closed forms worked out by hand, a brute-force count of a corpus written
out sequence by sequence, numpy's quantiles, loops over positions and pairs in plain Python, and numbers worked
out by hand.
The reference answers are in solutions.py (try first, then peek).

Each exercise is self-contained plain PyTorch (or plain Python): do not import the lesson scripts.
    ex01-ex03  the Poincaré ball (hyperbolic.py; Nickel & Kiela 2017, https://arxiv.org/abs/1705.08039)
    ex04       one BoundlessBPE supermerge (boundless_bpe.py; Schmidt et al. 2025, https://arxiv.org/abs/2504.00178)
    ex05-ex06  entropy patching and bits per byte (the Byte Latent Transformer, Pagnoni et al. 2024,
               https://arxiv.org/abs/2412.09871)
    ex07       the context gate of context-aware self-attention (Yang et al. 2019, https://arxiv.org/abs/1902.05766)
    ex08-ex11  the Large Concept Model (lcm.py; Barrault et al. 2024, https://arxiv.org/abs/2412.08821): its
               contrastive accuracy, the robust scaler, the Base-LCM loss and stopping rule, one DDIM step
    ex12       Coconut's continuous-thought forward (thoughts.py; Hao et al. 2024, https://arxiv.org/abs/2412.06769)
"""
import torch


def ex01_poincare_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The distance between points of the Poincaré ball {x : |x| < 1} (Nickel & Kiela 2017, Eq. 1):

        d(u, v) = arcosh(1 + 2 |u - v|^2 / ((1 - |u|^2) (1 - |v|^2)))

    u, v (..., d): points (the last dimension is the coordinates), broadcast against each other like any
    torch operation; return (...), one distance per pair. |x|^2 is the squared Euclidean norm over the last
    dimension. You may assume every point lies strictly inside the ball (no clamping needed here; the lesson's
    hyperbolic.poincare_distance adds the guards training needs).
        from the origin: d(0, x) = 2 artanh |x|, so d(0, (0.5, 0)) = 2 artanh 0.5 = ln 3 = 1.0986
    Near the boundary the denominator goes to 0 and distances grow without bound: the ball has room for the
    exponentially many nodes of a tree.
    Hint: torch.acosh; .pow(2).sum(-1) for squared norms.
    Plausible slips the check catches: the factor 2 left out; the denominator (1 - |u|^2)(1 - |v|^2) left
    out (then it is a function of the Euclidean distance alone); |u - v| not squared.
    """
    raise NotImplementedError


def ex02_mobius_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Möbius addition x ⊕ y in the Poincaré ball of curvature -1 (Ungar 2008; the "gyrovector" addition that
    hyperbolic networks use in place of +, e.g. Ganea et al. 2018, https://arxiv.org/abs/1805.09112):

        x ⊕ y = ((1 + 2<x, y> + |y|^2) x + (1 - |x|^2) y) / (1 + 2<x, y> + |x|^2 |y|^2)

    x, y (..., d), broadcast against each other; return (..., d). <x, y> is the dot product over the last
    dimension. Properties to expect: 0 ⊕ y = y and x ⊕ 0 = x; x ⊕ (-x) = 0; the left cancellation law
    (-x) ⊕ (x ⊕ y) = y; the result stays inside the ball; NOT commutative (x ⊕ y differs from y ⊕ x: they have
    the same norm but point in different directions). The distance is d(x, y) = 2 artanh |(-x) ⊕ y|: the
    origin's formula after moving x to the origin.
    Hint: keep the dot product and the squared norms with keepdim=True so they broadcast against x and y.
    Plausible slips the check catches: plain x + y (can leave the ball); |x|^2 and |y|^2 swapped in the
    numerator; the sign of 2<x, y> flipped; y ⊕ x instead of x ⊕ y.
    """
    raise NotImplementedError


def ex03_riemannian_grad(x: torch.Tensor, euclidean_grad: torch.Tensor) -> torch.Tensor:
    """The Riemannian gradient on the Poincaré ball from the Euclidean one (Nickel & Kiela 2017, Eq. 5):

        grad_R = ((1 - |x|^2)^2 / 4) * grad_E

    x (..., d): points in the ball; euclidean_grad (..., d): d loss / d x as autograd gives it; return (..., d).
    The metric of the ball is (2 / (1 - |x|^2))^2 times the Euclidean one, so the same Euclidean step is a
    longer and longer hyperbolic step near the boundary; dividing by that factor gives steepest descent in the
    hyperbolic metric. At the origin the factor is 1/4; near the boundary it goes to 0. Riemannian SGD then
    moves x by -lr * grad_R (and projects back inside the ball, or follows the exponential map as geoopt does).
    |x|^2 is per point: one factor per row, applied to every coordinate of that row's gradient.
    Plausible slips the check catches: the square left out, (1 - |x|^2) / 4; the / 4 left out; |x| instead of
    |x|^2; one factor for the whole batch instead of one per point.
    """
    raise NotImplementedError


def ex04_supermerge_step(corpus: list[list[tuple[str, ...]]],
                         counts: list[int]) -> tuple[tuple[str, str] | None, list[list[tuple[str, ...]]]]:
    """One BoundlessBPE supermerge (Schmidt et al. 2025, https://arxiv.org/abs/2504.00178; boundless_bpe.py).

    Part 4's BPE merges tokens only inside a pre-token (a word with its leading space, a number, a run of
    punctuation). BoundlessBPE may also merge two ADJACENT PRE-TOKENS into one token, a "superword":
    " of" + " the" -> " of the". The corpus here:
        corpus[s]   a sequence of pre-tokens (a stretch of text), each pre-token a tuple of its current tokens:
                    [(" of",), (" the",), (" qu", "een"), (",",)]  (" queen" is still two tokens)
        counts[s]   how many times sequence s occurs in the text (like Part 4's word counts)
    A pre-token may take part in a supermerge only when it is
        fully merged:  a single token, a tuple of length 1 ((" the",) yes; (" qu", "een") not yet), and
        letter-only:   that token has at least one letter and otherwise only letters, spaces, "_" and
                       apostrophes (' or ’): " the", "don", "'t", " of the" yes; "12", " .", ",", " ", "\\n" no
                       (a "letter" is a character c with c.isalpha()).
    The step:
        1. count every pair of adjacent pre-tokens that may both take part, as (left token, right token),
           weighting each occurrence by its sequence's count (every adjacent position counts, overlapping ones
           too: (" la",), (" la",), (" la",) holds the pair (" la", " la") twice, as Part 4's get_stats counts);
        2. take the most frequent pair; on a tie, the smallest (left, right) tuple in Python's ordering;
        3. in every sequence, replace each occurrence of the two pre-tokens (left,), (right,) by the one
           pre-token (left + right,), scanning left to right (three " la" become (" la la",), (" la",)).
    The superword is a single letter-only token, so it may join again at a later step (" of the" + " king").
    Return (pair, new_corpus): the pair merged, and the corpus after the merge (new lists and tuples, the
    input left as it was). With no pair to merge: (None, a copy of the corpus).
        corpus [[(" of",), (" the",), (" king",)], [(" of",), (" the",), (",",)], [(" the",), (" qu", "een")]]
        counts [3, 2, 4]
        pairs  (" of", " the") 3 + 2 = 5, (" the", " king") 3 (" queen" is not whole, "," is not letters)
        ->     ((" of", " the"), [[(" of the",), (" king",)], [(" of the",), (",",)], [(" the",), (" qu", "een")]])
    In the lesson the most frequent supermerge competes with the most frequent ordinary merge at every step,
    and a phrase is counted once per distinct run (like Part 4's words); this exercise is the supermerge side.
    Plausible slips the check catches: merging a pre-token that is not fully merged yet; letting digits,
    punctuation or spaces join; counting each sequence once whatever its count; a tie broken another way;
    merging overlapping occurrences twice; changing the input.
    """
    raise NotImplementedError


def ex05_entropy_patch_starts(entropies: torch.Tensor, threshold: float, monotonic: bool = False) -> torch.Tensor:
    """Where the Byte Latent Transformer's patches start (Pagnoni et al. 2024, https://arxiv.org/abs/2412.09871,
    section 2.3).

    BLT groups bytes into patches of varying length: a new patch starts where the next byte is hard to predict,
    so the big latent transformer spends its steps where the information is. entropies (..., T): entropies[t]
    is H(x_t), the entropy of a small byte model's prediction of byte t from the bytes before it (the
    distribution over byte t, computed from x_<t). Return a bool tensor of the same shape, True where a patch
    starts:
        position 0 always starts a patch (the first byte has to belong to one);
        global threshold (monotonic=False):        t >= 1 starts a patch when H(x_t) > threshold
        approximate monotonic (monotonic=True):     t >= 1 starts a patch when H(x_t) - H(x_{t-1}) > threshold
    The second marks where the entropy jumps up, rather than where it is high: a long stretch of high entropy
    is one patch, not one patch per byte. Strictly greater: a value equal to the threshold does not start one.
    The rules apply to each row of a batch (..., T) separately: a row's first difference is within the row.
        entropies [2.0, 0.5, 3.0, 2.0, 1.0, 2.5], threshold 2.0, global:    [T, F, T, F, F, T]
        the same, threshold 1.0, monotonic (differences -1.5, 2.5, -1, -1, 1.5):  [T, F, T, F, F, T]
    Careful with the index: the entropy that decides whether byte t starts a patch is the one of the
    prediction OF byte t (made at position t - 1 of a causal model). Marking t + 1 is the classic off-by-one.
    (blt.py, like BLT's reference code, also always starts a patch at byte 1, so that byte 0 is a patch of its
    own for its decoder; here only byte 0 is forced.)
    Plausible slips the check catches: >= instead of >; position 0 not forced; the mark one position late;
    the differences taken across the rows of a batch (flattened).
    """
    raise NotImplementedError


def ex06_bits_per_byte(loss_nats_per_token: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per byte from a language model's mean loss per token: the tokenizer-independent way to compare
    models (BLT reports it; a byte model and a BPE model see different numbers of tokens for the same text).

    loss_nats_per_token: the mean cross-entropy per token in nats (F.cross_entropy's natural log), over a text
    that is n_tokens tokens and n_bytes UTF-8 bytes. The total information is loss * n_tokens nats; a bit is
    ln 2 nats; per byte:
        bits/byte = loss_nats_per_token * n_tokens / ln(2) / n_bytes
    Return a Python float.
        loss 1.5 nats/token, 1000 tokens, 3000 bytes:  1.5 * 1000 / 0.6931 / 3000 = 0.7213 bits/byte
        a byte-level model (n_tokens = n_bytes): bits/byte = loss / ln 2 = log2 of the perplexity
        uniform over the 256 bytes: loss ln 256 per byte -> 8 bits/byte
    A tokenizer with longer tokens (fewer of them) has a higher loss per token for the same text: bits/byte
    puts them on one scale.
    Plausible slips the check catches: bits per token (no n_tokens / n_bytes); nats per byte (no ln 2);
    multiplying by ln 2 instead of dividing (log2 vs ln mixed up); bytes per token where tokens per byte belongs.
    """
    raise NotImplementedError


def ex07_context_gated_query(q: torch.Tensor, c: torch.Tensor, U: torch.Tensor, v1: torch.Tensor,
                             v2: torch.Tensor) -> torch.Tensor:
    """The context gate of context-aware self-attention (Yang et al. 2019, "Context-Aware Self-Attention
    Networks", AAAI, https://arxiv.org/abs/1902.05766, the gating of its section "Context-Aware Self-Attention").

    Self-attention compares each query with each key, but the query knows nothing of the sentence as a whole.
    Yang et al. mix a context vector into the query (and, the same way, into the key) through a learned gate:
        c_hat  = c U                                  the context projected into the query space
        lambda = sigmoid(q . v1 + c_hat . v2)          one gate in (0, 1) per position (a scalar)
        q_hat  = (1 - lambda) q + lambda c_hat         used in place of q in softmax(q_hat k_hat^T / sqrt(d)) v
    Shapes: q (..., n, d) the n queries; c (..., n, d_c) the context of each position (the global context,
    the mean of the layer's input, is one row (..., 1, d_c) that broadcasts over the n positions); U (d_c, d);
    v1 (d,) and v2 (d,) turn q and c_hat into one number each. Return q_hat (..., n, d).
    (The paper writes the gate as sigmoid(Q V_Q^H + C U_Q V_Q^C) with V^H, V^C of shape (d, 1): the same thing.)
        U the identity, v1 = v2 = 0: lambda = sigmoid(0) = 0.5 everywhere and q_hat = (q + c) / 2
        large positive v2 . c_hat: lambda -> 1 and q_hat -> c_hat (the context takes over)
    Plausible slips the check catches: lambda and 1 - lambda swapped; no sigmoid (an unbounded "gate"); a gate
    per channel (q * v1 + c_hat * v2 without the sum over d); c mixed in instead of c_hat = c U.
    """
    raise NotImplementedError


def ex08_contrastive_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The Large Concept Model's contrastive accuracy (Barrault et al. 2024, https://arxiv.org/abs/2412.08821,
    one of its pre-training evaluation metrics, "CA").

    An LCM predicts the embedding of the next sentence. Mean squared error alone does not say whether a
    prediction is useful: it may be near the batch's average embedding and near no sentence in particular.
    Contrastive accuracy asks whether the prediction singles out its own target among the batch's:
        pred (N, d): predicted embeddings; target (N, d): the true ones, target[i] the one pred[i] aims at.
        For each i: the fraction of the OTHER targets j != i that are strictly farther from pred[i] than
        target[i] is, in Euclidean (l2) distance:  #{j != i : |pred_i - target_j| > |pred_i - target_i|} / (N - 1)
        Return the mean over i, a Python float in [0, 1]. N >= 2.
    1 means every prediction is nearer its own target than any other target; a prediction that ignores its
    input scores about 0.5 on average. A tie (another target exactly as far) is not "farther": it does not count.
    (The paper, and lcm.py, also leave out the two sentences next to the target, which are often close to it;
    here only j = i is left out.)
        pred [(0, 0), (0, 2), (2, 0)], target [(1, 0), (0, 1), (3, 0)]: distances from pred[0] to the targets
        1, 1 (a tie), 3 -> 1/2; pred[1]: 1, sqrt 5, sqrt 13 -> 1; pred[2]: 1, sqrt 5, 1 (a tie) -> 1/2; mean 2/3
    Hint: torch.cdist(pred, target) is the (N, N) matrix |pred_i - target_j|; its diagonal holds each own distance.
    Plausible slips the check catches: j = i counted (divide by N); ties counted as farther (>=); cosine
    similarity instead of the l2 distance (they rank differently when norms differ); the matrix read by column
    (targets compared with the other predictions).
    """
    raise NotImplementedError


def ex09_robust_scale(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Large Concept Model's robust scaler (Barrault et al. 2024, https://arxiv.org/abs/2412.08821, section
    2.3.1; its reference code's "gaussian_robust" normalisation; lcm.py's RobustScaler).

    Sentence embeddings have dimensions with long tails: a few sentences sit far out, and a mean and a standard
    deviation follow them. The LCM normalises each dimension with statistics that ignore the tails:
        center = the median of the column
        scale  = (q75 - q25) / 1.349     the interquartile range, read as a normal distribution's std
        scaled = (x - center) / scale
    1.349 = Phi^-1(0.75) - Phi^-1(0.25), the IQR of a standard normal (torch.special.ndtri gives Phi^-1; the
    literal 1.349 is close enough): for normal data scale is the standard deviation, so after scaling every
    dimension has unit spread, as the diffusion noise N(0, I) assumes.
    x (N, d): N embeddings (the rows), d dimensions (the columns); the statistics are per column. Return
    (scaled (N, d), center (d,), scale (d,)). A quantile q is the linear interpolation between the order
    statistics at position q (N - 1) (numpy's and torch.quantile's default). A column whose IQR is 0 (constant)
    gets scale 1: leave it unscaled rather than divide by 0.
        a column [1, 2, 3, 4, 100]: q25 = 2 (position 1), median 3, q75 = 4 (position 3), scale 2 / 1.349 = 1.4826,
        scaled [-1.349, -0.674, 0, 0.674, 65.4]: the outlier stays an outlier, the rest keep unit spread
        (its mean is 22 and its standard deviation 43.6: they would squash 1..4 into a sliver)
        a column [1, 2, 3, 10]: median 2.5 (halfway between 2 and 3), q25 = 1.75, q75 = 4.75
    Hint: torch.quantile(x, q, dim=0) (mind the dim); torch.median returns the LOWER of the two middle values of
    an even count, not their mean.
    Plausible slips the check catches: the mean and standard deviation instead of the median and IQR; the IQR
    not divided by 1.349; the statistics of each row instead of each column; torch.median's lower middle value;
    a constant column divided by 0.
    """
    raise NotImplementedError


def ex10_base_lcm_loss_and_stop(pred: torch.Tensor, concepts: torch.Tensor, eot: torch.Tensor,
                                s_eot: float = 0.9, s_prev: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The Base-LCM's training objective and its stopping rule (Barrault et al. 2024,
    https://arxiv.org/abs/2412.08821, section 2.3.1; lcm.py's base_lcm_loss and stop_reason).

    A Base-LCM reads a document's concepts (sentence embeddings) x_0 .. x_{L-1} through a causal Transformer; its
    output at position i is its guess of the NEXT concept, x_{i+1}, from x_0 .. x_i. So:
        pred (B, L, d): pred[:, i], the model's output at position i; concepts (B, L, d): the true x_0 .. x_{L-1};
        loss = the mean over b, i < L - 1 and the d dimensions of (pred[b, i] - concepts[b, i + 1])^2
               (the paper's Eq. 1: the squared l2 error to the next concept; like lcm.py and F.mse_loss we take
               the mean over the dimensions too, the squared norm / d; the last output has no target: drop it)
    At generation the predicted concept is appended and fed back, until one of the paper's stopping rules fires:
        the prediction is the end of the text:  cos(pred[b, i], eot) >= s_eot      ("End of text."'s concept)
        or it repeats the previous concept:     cos(pred[b, i], concepts[b, i]) >= s_prev
    (the previous concept of the prediction made at position i is concepts[b, i], the last one the model read;
    cos is the cosine similarity, a.b / (|a| |b|); both thresholds are 0.9 in the paper). Return (loss, stop): loss a
    0-d tensor that autograd can train on; stop (B, L) bool, True where generation would stop at that prediction.
        concepts [(1, 0), (0, 1), (1, 1)], eot (-1, 0), pred [(0, 2), (0.2, 2), (-3, 0.1)]:
        loss ((0-0)^2 + (2-1)^2 + (0.2-1)^2 + (2-1)^2) / 4 = (0 + 1 + 0.64 + 1) / 4 = 0.66
        stop [False, True (cos((0.2, 2), (0, 1)) = 0.995: a repetition), True (cos((-3, 0.1), eot) = 0.9994)]
    Hint: torch.nn.functional.mse_loss and cosine_similarity(..., dim=-1); eot (d,) broadcasts against (B, L, d).
    Plausible slips the check catches: no shift (pred[:, i] compared with x_i, the concept it has just read); the
    sum instead of the mean; a Euclidean distance or a dot product instead of the cosine (a concept twice as long
    points the same way); > instead of >=; both rules required at once (and instead of or).
    """
    raise NotImplementedError


def ex11_ddim_step(x_t: torch.Tensor, x0_pred: torch.Tensor, alpha_bar_t: float,
                   alpha_bar_prev: float) -> torch.Tensor:
    """One deterministic DDIM step from a predicted clean vector (Song et al. 2020, https://arxiv.org/abs/2010.02502,
    Eq. 12 with eta = 0; lcm.py's ddim_step, the diffusion LCM's sampler).

    The forward process noises a clean x_0 to x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps (a_t = alpha_bar_t, from 1 at
    t = 0, clean, down to 0, pure noise). The diffusion LCM predicts x0_pred from x_t (x0-prediction). DDIM then
    moves to the earlier, less noisy step t_prev without any new randomness:
        eps_hat = (x_t - sqrt(a_t) x0_pred) / sqrt(1 - a_t)           the noise that x0_pred implies
        x_prev  = sqrt(a_prev) x0_pred + sqrt(1 - a_prev) eps_hat     noise x0_pred again, to level a_prev
    x_t, x0_pred (..., d) (any shape, the same); alpha_bar_t and alpha_bar_prev Python floats, with
    0 <= a_t < 1 and a_t <= a_prev <= 1. Return x_prev, the shape of x_t.
        x_t = 1.0, x0_pred = 0.5, a_t = 0.36, a_prev = 0.64: eps_hat = (1 - 0.6 * 0.5) / 0.8 = 0.875,
        x_prev = 0.8 * 0.5 + 0.6 * 0.875 = 0.925
    Properties to expect: a_prev = 1 (the last step, t_prev = 0) gives x0_pred itself; a_prev = a_t leaves x_t as
    it is; if x_t is exactly sqrt(a_t) x0_pred + sqrt(1 - a_t) eps, the step lands on sqrt(a_prev) x0_pred +
    sqrt(1 - a_prev) eps: the same noise, less of it (a perfect x0 prediction walks back along its own trajectory).
    (lcm.py also divides eps_hat by an epsilon_scaling a little above 1, Ning et al. 2023; leave that out here.)
    Hint: math.sqrt for the floats.
    Plausible slips the check catches: eps_hat divided by (1 - a_t) instead of its square root; sqrt(a_t) left out
    of eps_hat; a_t and a_prev swapped; x_prev's noise weighted by (1 - a_prev) instead of its square root.
    """
    raise NotImplementedError


def ex12_continuous_thought_forward(model, prompt_embeds: torch.Tensor, n_thoughts: int) -> torch.Tensor:
    """Coconut's continuous thoughts (Hao et al. 2024, "Training Large Language Models to Reason in a Continuous
    Latent Space", https://arxiv.org/abs/2412.06769, section 3; thoughts.py's continuous_forward).

    Chain-of-thought makes a model write its reasoning as tokens: each step squeezed through one sampled token.
    Coconut skips the tokens: after <bot>, the model's LAST HIDDEN STATE (the vector the LM head would read) is
    fed straight back as the next INPUT EMBEDDING, a "continuous thought", n_thoughts times:
        inputs = prompt_embeds                                  (B, T, d), ending with <bot>'s embedding
        repeat n_thoughts times:
            hidden = model(inputs)                              (B, T', d): causal, one hidden state per position
            inputs = concat(inputs, hidden[:, -1:], dim=1)      the last position's hidden state: a new input
    model: any callable (a function or an nn.Module) mapping input embeddings (B, T', d) to last hidden states
    (B, T', d), causally (position t sees inputs 0..t); prompt_embeds (B, T, d). Return the inputs after the
    thoughts, (B, T + n_thoughts, d): the prompt, then thought k = the hidden state at position T + k - 1 of the
    pass over the first T + k inputs. (The caller then appends <eot> and the answer, and reads the answer's
    hidden states as usual.) n_thoughts = 0 returns the prompt as it is.
    The thoughts stay differentiable: a loss on the answer back-propagates through every thought into the prompt
    and the model (no .detach(); in place of a sampled token, which would cut the gradient).
        model(x) = 2 x at every position, prompt [[1.0]] (B = 1, T = 1, d = 1), 3 thoughts:
        [[1]] -> hidden [[2]] -> inputs [[1], [2]] -> hidden [[2], [4]] -> [[1], [2], [4]] -> ... [[1], [2], [4], [8]]
    Each pass here recomputes the whole sequence (n_thoughts passes); thoughts.py keeps a KV cache, so each pass
    computes only the new position: same numbers for a causal model.
    Hint: torch.cat((inputs, hidden[:, -1:]), dim=1) keeps the time dimension.
    Plausible slips the check catches: feeding back the last INPUT embedding instead of the hidden state; the
    hidden state of another position (the first, or the one before last); one thought too few; running the model
    on the newest thought alone, without the context; .detach() on the thought.
    """
    raise NotImplementedError
