// Inside the model: four views of one forward pass over the prompt (POST /api/inspect), all drawn here from its
// answer, so they work offline. Tokens: the prompt as the model reads it. Attention: one heatmap per layer and
// head. Layer by layer: the logit lens at a clicked position. Step: the next-token distribution, sampled by hand.
// Uses $, headers and errorMessage from app.js.
"use strict";

const STEP_TOP = 20; // bars in the step view: /api/inspect's lens then lists the 20 likeliest tokens
let inspection = null; // the last /api/inspect answer
let position = 0; // the clicked token (query) in the strip
let head = { layer: 0, head: 0 }; // the heatmap whose attention shades the strip
let view = "tokens";
let asked = 0; // inspections asked for: an answer to an older one (the student clicked on) is dropped

// ---------------------------------------------------------------- fetching

async function inspectPrompt() {
  const status = $("inspect_status");
  const ticket = ++asked;
  const text = $("prompt").value;
  status.textContent = "inspecting...";
  const r = await fetch("/api/inspect", {
    method: "POST", headers: headers(), body: JSON.stringify({ text: text, top: STEP_TOP }),
  });
  const answer = r.ok ? await r.json() : await errorMessage(r);
  if (ticket !== asked) return;
  if (!r.ok) {
    status.textContent = answer;
    return;
  }
  inspection = { ...answer, text: text };
  position = inspection.tokens.length - 1; // the last token: the one whose next token comes next
  if (head.layer >= inspection.layers.length) head = { layer: 0, head: 0 };
  status.textContent = `${inspection.tokens.length} tokens, ${inspection.lens.length} layers, ` +
    `${inspection.attention[0].length} heads`;
  render();
}

function render() {
  if (!inspection) return;
  renderStrip();
  if (view === "attention") renderHeads();
  if (view === "layers") renderLayers();
  if (view === "step") renderBars();
}

// ---------------------------------------------------------------- the token strip (the Tokens view itself)

function visible(text) {
  // a newline would be an invisible box: show it as an arrow, then break the line as the text does
  return text.replace(/\n/g, "\u21b5\n");
}

function renderStrip() {
  // the selected head's row for the clicked token: how much it reads from each earlier token
  const row = view === "attention" ? inspection.attention[head.layer][head.head][position] : null;
  const spans = inspection.tokens.map((t, i) => {
    const span = document.createElement("span");
    span.className = "tok" + (i === position ? " selected" : "");
    span.textContent = visible(t.text);
    span.title = `token ${i}: id ${t.id} ${JSON.stringify(t.text)}`;
    span.dataset.pos = i;
    if (row) span.style.background = `rgba(31, 119, 180, ${row[i].toFixed(3)})`;
    return span;
  });
  $("strip").replaceChildren(...spans);
}

$("strip").addEventListener("click", (e) => {
  const span = e.target.closest(".tok");
  if (!span) return;
  position = +span.dataset.pos;
  render();
});

// ---------------------------------------------------------------- attention heatmaps

function drawHeatmap(canvas, weights, query) {
  // one pixel per (query, key), scaled up by CSS; sqrt so that small weights still show. The clicked query's
  // row is drawn in blue, so a click visibly changes every map.
  const T = weights.length;
  canvas.width = T;
  canvas.height = T;
  const g = canvas.getContext("2d");
  const img = g.createImageData(T, T);
  for (let q = 0; q < T; q++) {
    const ink = q === query ? [31, 119, 180] : [0, 0, 0];
    for (let k = 0; k < T; k++) {
      const v = Math.sqrt(weights[q][k]);
      const o = 4 * (q * T + k);
      for (let c = 0; c < 3; c++) img.data[o + c] = Math.round(255 - v * (255 - ink[c]));
      img.data[o + 3] = 255;
    }
  }
  g.putImageData(img, 0, 0);
}

function headFigure(li, h) {
  const fig = document.createElement("figure");
  fig.className = "head" + (li === head.layer && h === head.head ? " selected" : "");
  const canvas = document.createElement("canvas");
  drawHeatmap(canvas, inspection.attention[li][h], position);
  canvas.title = `layer ${inspection.layers[li] + 1}, head ${h + 1}: click to shade the text with it`;
  canvas.addEventListener("click", () => {
    head = { layer: li, head: h };
    render();
  });
  const caption = document.createElement("figcaption");
  caption.textContent = `L${inspection.layers[li] + 1} H${h + 1}`;
  fig.append(canvas, caption);
  return fig;
}

function renderHeads() {
  // one row per layer, one map per head
  const rows = inspection.attention.map((heads, li) => {
    const row = document.createElement("div");
    row.className = "head-row";
    row.append(...heads.map((_, h) => headFigure(li, h)));
    return row;
  });
  $("heads").replaceChildren(...rows);
}

// ---------------------------------------------------------------- layer by layer (the logit lens)

function prediction(entry) {
  const span = document.createElement("span");
  span.className = "pred";
  span.textContent = `${JSON.stringify(entry.text)} ${(100 * entry.prob).toFixed(1)}%`;
  span.title = `id ${entry.id}`;
  span.style.background = `rgba(44, 160, 44, ${(0.7 * entry.prob).toFixed(3)})`;
  return span;
}

function renderLayers() {
  const n = inspection.lens.length;
  const rows = inspection.lens.map((layer, li) => {
    const row = document.createElement("div");
    row.className = "layer-row";
    const label = document.createElement("span");
    label.className = "layer-label";
    label.textContent = li === n - 1 ? `layer ${li + 1} (output)` : `after layer ${li + 1}`;
    row.append(label, ...layer[position].slice(0, 5).map(prediction));
    return row;
  });
  const t = inspection.tokens[position];
  const title = document.createElement("p");
  title.textContent = `next token after token ${position} (${JSON.stringify(t.text)}):`;
  $("layers").replaceChildren(title, ...rows);
}

// ---------------------------------------------------------------- step: the next-token distribution

function sampling(probs) {
  // The page's sampling controls applied to the top-20 (their probabilities at temperature 1): temperature
  // reshapes them (p^(1/T), renormalised over these 20), then top-k and top-p cut the tail. Returns
  // {shaped, kept}: the shaped probabilities and how many of the likeliest survive the cut.
  const temperature = parseFloat($("temperature").value);
  if (temperature === 0) return { shaped: probs.map((_, i) => (i === 0 ? 1 : 0)), kept: 1 }; // greedy
  const powered = probs.map((p) => Math.pow(p, 1 / temperature));
  const sum = powered.reduce((a, b) => a + b, 0);
  const shaped = powered.map((p) => p / sum);
  const topK = parseInt($("top_k").value, 10);
  let kept = topK > 0 ? Math.min(topK, shaped.length) : shaped.length;
  const topP = parseFloat($("top_p").value);
  let mass = 0;
  for (let i = 0; i < kept; i++) {
    mass += shaped[i];
    if (mass >= topP - 1e-9) {
      kept = i + 1; // the smallest set of likeliest tokens holding top_p of the mass
      break;
    }
  }
  return { shaped, kept };
}

function bar(entry, p, cut) {
  const row = document.createElement("div");
  row.className = "bar" + (cut ? " cut" : "");
  row.title = `id ${entry.id}, ${(100 * entry.prob).toFixed(2)}% at temperature 1` + (cut ? " (cut off)" : "");
  const label = document.createElement("span");
  label.className = "bar-label";
  label.textContent = JSON.stringify(entry.text);
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = (100 * p).toFixed(1) + "%";
  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = (100 * p).toFixed(1) + "%";
  row.append(label, fill, value);
  row.addEventListener("click", () => choose(entry.text));
  return row;
}

function renderBars() {
  const lens = inspection.lens;
  const next = lens[lens.length - 1][inspection.tokens.length - 1]; // the model's output after the last token
  const { shaped, kept } = sampling(next.map((e) => e.prob));
  const mass = shaped.slice(0, kept).reduce((a, b) => a + b, 0);
  // a kept token's bar: its probability after the cut (what sampling draws from); a cut one's: before it
  const bars = next.map((e, i) => bar(e, i < kept ? shaped[i] / mass : shaped[i], i >= kept));
  const note = document.createElement("p");
  note.className = "muted";
  note.textContent = `${kept} of ${next.length} tokens kept by temperature, top-k and top-p`;
  $("bars").replaceChildren(note, ...bars);
}

function choose(text) {
  // the student's pick becomes part of the prompt; inspect again for the next step. A GPT-2 token holding
  // part of a multi-byte character decodes alone as U+FFFD: as text it would become another token, so no.
  if (text.includes("\ufffd")) {
    $("inspect_status").textContent = "that token is part of a character: it cannot be typed alone";
    return;
  }
  $("prompt").value += text;
  inspectPrompt();
}

function sampleOne() {
  // draw from the kept bars, as the server's sampler would
  const lens = inspection.lens;
  const next = lens[lens.length - 1][inspection.tokens.length - 1];
  const { shaped, kept } = sampling(next.map((e) => e.prob));
  const mass = shaped.slice(0, kept).reduce((a, b) => a + b, 0);
  let r = Math.random() * mass;
  let i = 0;
  while (i < kept - 1 && (r -= shaped[i]) > 0) i++;
  choose(next[i].text);
}

// ---------------------------------------------------------------- tabs

function showView(name) {
  view = name;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", tab.dataset.view === name);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== "view_" + name;
  // the prompt may have changed since the last inspection: the views always show the current one
  if (inspection && inspection.text === $("prompt").value) render();
  else inspectPrompt();
}

for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));
$("inspect").addEventListener("click", inspectPrompt);
$("api_key").addEventListener("change", inspectPrompt);
$("step_sample").addEventListener("click", () => inspection && sampleOne());
for (const id of ["temperature", "top_k", "top_p"]) {
  $(id).addEventListener("input", () => view === "step" && inspection && renderBars());
}
showView("tokens"); // inspect the starting prompt, so the strip shows its tokens from the start
