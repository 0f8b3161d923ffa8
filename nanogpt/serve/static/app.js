// The nanogpt playground: streams /v1/completions (server-sent events, with logprobs for the shading and
// the hover), and draws the run's loss curve from /api/metrics. No framework, no CDN: works offline.
"use strict";

const $ = (id) => document.getElementById(id);
let modelId = null;
let controller = null; // aborts the running generation

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

// ---------------------------------------------------------------- the model and the controls

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (!r.ok) {
    $("model").textContent = await errorMessage(r);
    return;
  }
  const card = (await r.json()).data[0];
  modelId = card.id;
  $("model").textContent = `${card.id} (context ${card.max_model_len} tokens)`;
  $("max_tokens").max = card.max_tokens;
  if (+$("max_tokens").value > card.max_tokens) $("max_tokens").value = card.max_tokens;
  showValues();
}

function showValues() {
  for (const out of document.querySelectorAll("output")) out.textContent = $(out.htmlFor.value).value;
}

// ---------------------------------------------------------------- generation

function probabilityColor(p) {
  // likely tokens stay pale, unlikely ones turn orange
  return `rgba(255, 140, 0, ${(0.85 * (1 - p)).toFixed(3)})`;
}

function addToken(text, logprob, top) {
  const span = document.createElement("span");
  span.className = "token";
  span.textContent = text;
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.style.background = probabilityColor(p);
    span.dataset.p = p.toFixed(4);
    span.dataset.top = JSON.stringify(top || {});
  }
  $("output").appendChild(span);
}

async function generate() {
  if (!modelId) await loadModel();
  if (!modelId) return;
  const prompt = $("prompt").value;
  const out = $("output");
  out.textContent = "";
  const p = document.createElement("span");
  p.className = "prompt";
  p.textContent = prompt;
  out.appendChild(p);
  const topK = parseInt($("top_k").value, 10);
  const body = {
    model: modelId,
    prompt: prompt,
    max_tokens: parseInt($("max_tokens").value, 10),
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
    stream: true,
    logprobs: 5,
  };
  if (topK > 0) body.top_k = topK;
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating...";
  const t0 = performance.now();
  let count = 0;
  try {
    const r = await fetch("/v1/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) throw new Error(await errorMessage(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const c of chunk.choices) {
          if (c.finish_reason || !c.logprobs) continue;
          addToken(c.text, c.logprobs.token_logprobs[0], c.logprobs.top_logprobs[0]);
          count += 1;
        }
      }
      $("status").textContent = `${count} tokens, ${(count / ((performance.now() - t0) / 1000)).toFixed(1)} tokens/s`;
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = e.message;
      out.appendChild(err);
    }
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("stop").disabled = true;
    if (!count) $("status").textContent = "";
  }
}

// ---------------------------------------------------------------- the hover: alternatives

function showTooltip(span, x, y) {
  const tip = $("tooltip");
  const top = JSON.parse(span.dataset.top);
  const rows = Object.entries(top).sort((a, b) => b[1] - a[1]);
  const table = document.createElement("table");
  for (const [text, lp] of rows) {
    const tr = document.createElement("tr");
    if (text === span.textContent) tr.className = "chosen";
    const t = document.createElement("td");
    t.textContent = JSON.stringify(text);
    const pr = document.createElement("td");
    pr.textContent = (100 * Math.exp(lp)).toFixed(1) + "%";
    tr.append(t, pr);
    table.appendChild(tr);
  }
  tip.replaceChildren(`chosen: ${JSON.stringify(span.textContent)} (${(100 * span.dataset.p).toFixed(1)}%)`, table);
  tip.hidden = false;
  tip.style.left = Math.min(x + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = y + 16 + "px";
}

$("output").addEventListener("mouseover", (e) => {
  const span = e.target.closest(".token");
  if (span && span.dataset.top) showTooltip(span, e.clientX, e.clientY);
});
$("output").addEventListener("mouseout", (e) => {
  if (e.target.closest(".token")) $("tooltip").hidden = true;
});

// ---------------------------------------------------------------- the loss curve

async function drawLoss() {
  const r = await fetch("/api/metrics", { headers: headers() });
  const note = $("loss_note");
  if (!r.ok) {
    note.textContent = await errorMessage(r);
    return;
  }
  const records = (await r.json()).records;
  drawTimeline(records.filter((d) => d.kind === "sample"));
  const train = records.filter((d) => d.kind === "train" && d.train_loss !== null).map((d) => [d.iter, d.train_loss]);
  const val = records.filter((d) => d.kind === "eval" && d.val_loss !== null).map((d) => [d.iter, d.val_loss]);
  const canvas = $("loss");
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  if (!train.length && !val.length) {
    note.textContent = "No metrics.jsonl for this model (it comes from a training run's out_dir).";
    return;
  }
  const all = train.concat(val);
  const xs = all.map((d) => d[0]), ys = all.map((d) => d[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
  const m = { l: 44, r: 10, t: 10, b: 28 };
  const W = canvas.width - m.l - m.r, H = canvas.height - m.t - m.b;
  const px = (x) => m.l + ((x - x0) / (x1 - x0 || 1)) * W;
  const py = (y) => m.t + (1 - (y - y0) / (y1 - y0 || 1)) * H;
  g.strokeStyle = "#ccc";
  g.fillStyle = "#555";
  g.font = "11px sans-serif";
  g.strokeRect(m.l, m.t, W, H);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    g.fillText(y.toFixed(2), 4, py(y) + 4);
  }
  g.fillText(`iteration ${x0} .. ${x1}`, m.l, canvas.height - 8);
  const line = (points, color, width) => {
    g.strokeStyle = color;
    g.lineWidth = width;
    g.beginPath();
    points.forEach(([x, y], i) => (i ? g.lineTo(px(x), py(y)) : g.moveTo(px(x), py(y))));
    g.stroke();
  };
  line(train, "rgba(31, 119, 180, 0.5)", 1);
  line(val, "#d62728", 2);
  const last = val.length ? val[val.length - 1] : null;
  note.textContent = `blue: train loss, red: val loss` + (last ? ` (last ${last[1].toFixed(4)} at iteration ${last[0]})` : "");
}

// ---------------------------------------------------------------- the samples written while training

function drawTimeline(samples) {
  // one entry per evaluation: the iteration, its val loss and the text the model wrote then, so a student
  // sees gibberish turn into Shakespeare as the loss curve beside it falls
  const items = samples.map((d) => {
    const li = document.createElement("li");
    const head = document.createElement("div");
    head.className = "muted";
    const loss = d.val_loss === null || d.val_loss === undefined ? "" : `, val loss ${d.val_loss.toFixed(3)}`;
    head.textContent = `iteration ${d.iter}${loss}`;
    const text = document.createElement("pre");
    text.textContent = d.prompt + d.text;
    li.append(head, text);
    return li;
  });
  $("timeline").replaceChildren(...items);
  $("timeline_box").hidden = !samples.length;
}

for (const input of document.querySelectorAll("input[type=range]")) input.addEventListener("input", showValues);
$("generate").addEventListener("click", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate();
});
$("api_key").addEventListener("change", () => { loadModel(); drawLoss(); });
showValues();
loadModel();
drawLoss();
