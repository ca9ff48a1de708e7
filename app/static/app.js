// The try-the-models page: pick or drop an image, send it to /v1/detect or /v1/classify, draw
// the answer over the image. Detections are asked for once with a low score floor; the slider
// filters them here, without a new request. No external resources, no inline script (CSP).
// API paths are relative to the page ("v1/models", not "/v1/models"), so the page also works
// behind a proxy that serves the service under a path prefix (deploy/nginx: /vision/).
"use strict";

(() => {
  /** Detections are requested at this score floor and cap, then filtered by the slider. */
  const SCORE_FLOOR = 0;
  const MAX_DETECTIONS = 1000;
  /** The overlay canvas is drawn at the image's own pixels, at most this long side. */
  const MAX_CANVAS_SIDE = 4096;
  const GOLDEN = (Math.sqrt(5) - 1) / 2;

  const $ = (id) => document.getElementById(id);
  const ui = {
    body: document.body,
    model: $("model"),
    modelInfo: $("model-info"),
    threshold: $("threshold"),
    thresholdValue: $("threshold-value"),
    thresholdControl: $("threshold-control"),
    topk: $("topk"),
    topkControl: $("topk-control"),
    apiKey: $("api-key"),
    drop: $("drop"),
    file: $("file"),
    error: $("error"),
    summary: $("summary"),
    stage: $("stage"),
    preview: $("preview"),
    overlay: $("overlay"),
    table: $("detections"),
    predictions: $("predictions"),
  };

  const state = {
    models: new Map(), // name -> summary from /v1/models
    file: null, // the chosen File
    imageUrl: null, // its object URL, shown in <img>
    answer: null, // {task, model, result, serverMs, roundTripMs}
    sequence: 0, // answers to older requests are dropped
  };

  // -- colours: the same per class as the server's rendered images (app/render.py) -------------

  function classColour(classId) {
    const hue = (0.03 + classId * GOLDEN) % 1;
    const [r, g, b] = hsvToRgb(hue, 0.85, 0.95);
    return { css: `rgb(${r}, ${g}, ${b})`, text: 0.2126 * r + 0.7152 * g + 0.0722 * b > 140 ? "#000" : "#fff" };
  }

  function hsvToRgb(h, s, v) {
    const i = Math.floor(h * 6);
    const f = h * 6 - i;
    const p = v * (1 - s);
    const q = v * (1 - s * f);
    const t = v * (1 - s * (1 - f));
    const rgb = [[v, t, p], [q, v, p], [p, v, t], [p, q, v], [t, p, v], [v, p, q]][i % 6];
    return rgb.map((c) => Math.round(c * 255));
  }

  // -- the API --------------------------------------------------------------------------------

  class ApiFailure extends Error {}

  /** fetch + JSON, with the API key when given; API errors become readable ApiFailure messages. */
  async function callApi(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = ui.apiKey.value.trim();
    if (key) headers.set("X-API-Key", key);
    const started = performance.now();
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiFailure(`Cannot reach the server (${err.message}). Is it still running?`);
    }
    const roundTripMs = performance.now() - started;
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) throw new ApiFailure(describeError(response, body, text));
    return { body, roundTripMs, serverMs: serverTiming(response.headers.get("Server-Timing")) };
  }

  function describeError(response, body, text) {
    const status = `${response.status} ${response.statusText || ""}`.trim();
    if (body && typeof body.error === "string") {
      const hint = {
        UNAUTHORIZED: "\nThe server wants an API key: open “API key” above.",
        OVERLOADED: "\nThe model is busy; try again in a moment.",
        NOT_READY: "\nThe models are still loading; try again in a moment.",
      }[body.code] || "";
      return `${body.code || status}: ${body.error}${hint}\n(HTTP ${status}, request ${body.request_id || "-"})`;
    }
    return `HTTP ${status}: ${text.slice(0, 300) || "no details"}`;
  }

  /** The `app;dur=…` entry of a Server-Timing header, in ms (null when absent). */
  function serverTiming(header) {
    if (!header) return null;
    for (const entry of header.split(",")) {
      const match = /(?:^|;)\s*dur=([0-9.]+)/.exec(entry.trim());
      if (match) return Number(match[1]);
    }
    return null;
  }

  // -- models ---------------------------------------------------------------------------------

  async function loadModels() {
    try {
      const { body } = await callApi("v1/models");
      state.models = new Map(body.models.map((m) => [m.name, m]));
      ui.model.replaceChildren(
        ...body.models.map((m) => new Option(`${m.name} (${m.task}, ${m.arch})`, m.name)),
      );
      const first = body.models.find((m) => m.task === "detect" && m.default) || body.models[0];
      if (!first) throw new ApiFailure("The server serves no models.");
      ui.model.value = first.name;
      await modelChanged();
      showError(null);
      setState("idle");
    } catch (err) {
      showError(err);
      setState("error");
    }
  }

  async function modelChanged() {
    const model = state.models.get(ui.model.value);
    if (!model) return;
    const detect = model.task === "detect";
    ui.thresholdControl.hidden = !detect;
    ui.topkControl.hidden = detect;
    ui.modelInfo.textContent = `${model.num_classes} classes · ${model.device} · ${model.dtype}`;
    try {
      const { body } = await callApi(`v1/models/${encodeURIComponent(model.name)}`);
      const defaults = body.defaults || {};
      if (detect) setThreshold(defaults.score_threshold ?? 0.5);
      else if (defaults.top_k) ui.topk.value = defaults.top_k;
    } catch (err) {
      showError(err);
    }
    if (state.file) await send();
  }

  // -- sending --------------------------------------------------------------------------------

  function chooseFile(file) {
    if (!file) return;
    state.file = file;
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = URL.createObjectURL(file);
    state.answer = null;
    clearAnswer();
    ui.preview.src = state.imageUrl;
    ui.stage.hidden = false;
    send();
  }

  async function send() {
    const model = state.models.get(ui.model.value);
    if (!model || !state.file) return;
    const sequence = ++state.sequence;
    const params = new URLSearchParams({ model: model.name });
    if (model.task === "detect") {
      params.set("score_threshold", String(SCORE_FLOOR));
      params.set("max_detections", String(MAX_DETECTIONS));
    } else {
      params.set("top_k", String(clampTopK()));
    }
    const form = new FormData();
    form.append("file", state.file, state.file.name || "image");
    setState("loading");
    showError(null);
    ui.summary.textContent = `Sending ${state.file.name || "the image"} to ${model.name}`;
    try {
      const { body, roundTripMs, serverMs } = await callApi(`v1/${model.task}?${params}`, {
        method: "POST",
        body: form,
      });
      if (sequence !== state.sequence) return; // a newer request is under way
      state.answer = { task: model.task, model: body.model, result: body.results[0], serverMs, roundTripMs };
      render();
      setState("done");
    } catch (err) {
      if (sequence !== state.sequence) return;
      state.answer = null;
      clearAnswer();
      ui.summary.textContent = "";
      showError(err);
      setState("error");
    }
  }

  function clampTopK() {
    const k = Math.min(20, Math.max(1, Math.round(Number(ui.topk.value) || 5)));
    ui.topk.value = k;
    return k;
  }

  // -- showing --------------------------------------------------------------------------------

  function render() {
    const answer = state.answer;
    if (!answer) return;
    if (answer.task === "detect") renderDetections(answer);
    else renderPredictions(answer);
  }

  function visibleDetections(answer) {
    const threshold = Number(ui.threshold.value);
    return answer.result.detections.filter((d) => d.score >= threshold);
  }

  function renderDetections(answer) {
    const shown = visibleDetections(answer);
    ui.predictions.hidden = true;
    ui.table.hidden = false;
    const rows = shown.map((d, i) => {
      const tr = document.createElement("tr");
      tr.dataset.classId = d.class_id;
      tr.dataset.score = d.score;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = classColour(d.class_id).css;
      const label = document.createElement("td");
      label.append(swatch, d.label);
      const box = d.box;
      tr.append(
        cell(String(i + 1), "num"),
        label,
        cell(d.score.toFixed(3), "num"),
        cell([box.x1, box.y1, box.x2, box.y2].map((v) => v.toFixed(1)).join(", ")),
      );
      return tr;
    });
    ui.table.tBodies[0].replaceChildren(...rows);
    drawBoxes(shown, answer.result.image);
    const total = answer.result.detections.length;
    ui.summary.textContent =
      `${answer.model}: ${shown.length} of ${total} detection${total === 1 ? "" : "s"} ` +
      `with score ≥ ${Number(ui.threshold.value).toFixed(3)} · ${timing(answer)}`;
  }

  function renderPredictions(answer) {
    ui.table.hidden = true;
    ui.predictions.hidden = false;
    drawBoxes([], answer.result.image);
    const items = answer.result.predictions.map((p) => {
      const li = document.createElement("li");
      li.dataset.classId = p.class_id;
      li.dataset.score = p.score;
      const row = document.createElement("div");
      row.className = "row";
      const name = document.createElement("span");
      name.textContent = p.label;
      const score = document.createElement("span");
      score.textContent = `${(p.score * 100).toFixed(1)} %`;
      row.append(name, score);
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("div");
      fill.className = "fill";
      fill.style.width = `${Math.max(0.5, p.score * 100)}%`;
      fill.style.background = classColour(p.class_id).css;
      bar.append(fill);
      li.append(row, bar);
      return li;
    });
    ui.predictions.replaceChildren(...items);
    const top = answer.result.predictions[0];
    ui.summary.textContent =
      `${answer.model}: ${top ? `${top.label} (${(top.score * 100).toFixed(1)} %)` : "no prediction"} · ` +
      timing(answer);
  }

  function timing(answer) {
    const server = answer.serverMs == null ? "" : `server ${answer.serverMs.toFixed(0)} ms, `;
    return `${server}round trip ${answer.roundTripMs.toFixed(0)} ms`;
  }

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    return td;
  }

  /** Boxes in the API's pixels (the image as displayed) onto the overlay canvas. */
  function drawBoxes(detections, size) {
    const canvas = ui.overlay;
    const scale = Math.min(1, MAX_CANVAS_SIDE / Math.max(size.width, size.height));
    canvas.width = Math.max(1, Math.round(size.width * scale));
    canvas.height = Math.max(1, Math.round(size.height * scale));
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const long = Math.max(canvas.width, canvas.height);
    const fontPx = Math.max(10, Math.round(0.022 * long));
    const line = Math.max(1, Math.round(fontPx / 6));
    ctx.font = `${fontPx}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    for (const d of [...detections].reverse()) { // the best last, on top
      const colour = classColour(d.class_id);
      const x = d.box.x1 * scale;
      const y = d.box.y1 * scale;
      const w = (d.box.x2 - d.box.x1) * scale;
      const h = (d.box.y2 - d.box.y1) * scale;
      ctx.lineWidth = line;
      ctx.strokeStyle = colour.css;
      ctx.strokeRect(x + line / 2, y + line / 2, Math.max(0, w - line), Math.max(0, h - line));
      const text = `${d.label} ${d.score.toFixed(2)}`;
      const pad = Math.max(1, Math.round(fontPx / 8));
      const boxW = ctx.measureText(text).width + 2 * pad;
      const boxH = fontPx + 2 * pad;
      const lx = Math.max(0, Math.min(x, canvas.width - boxW));
      let ly = y - boxH >= 0 ? y - boxH : y;
      ly = Math.max(0, Math.min(ly, canvas.height - boxH));
      ctx.fillStyle = colour.css;
      ctx.fillRect(lx, ly, boxW, boxH);
      ctx.fillStyle = colour.text;
      ctx.fillText(text, lx + pad, ly + pad);
    }
    canvas.dataset.boxes = String(detections.length);
  }

  function clearAnswer() {
    ui.table.hidden = true;
    ui.predictions.hidden = true;
    ui.table.tBodies[0].replaceChildren();
    ui.predictions.replaceChildren();
    const ctx = ui.overlay.getContext("2d");
    ctx.clearRect(0, 0, ui.overlay.width, ui.overlay.height);
    ui.overlay.dataset.boxes = "0";
  }

  function setThreshold(value) {
    ui.threshold.value = String(value);
    ui.thresholdValue.value = Number(ui.threshold.value).toFixed(3);
  }

  function showError(err) {
    if (!err) {
      ui.error.hidden = true;
      ui.error.textContent = "";
      return;
    }
    ui.error.textContent = err instanceof ApiFailure ? err.message : `Unexpected error: ${err}`;
    ui.error.hidden = false;
  }

  function setState(name) {
    ui.body.dataset.state = name;
  }

  // -- wiring ---------------------------------------------------------------------------------

  ui.model.addEventListener("change", () => modelChanged());
  ui.threshold.addEventListener("input", () => {
    ui.thresholdValue.value = Number(ui.threshold.value).toFixed(3);
    if (state.answer && state.answer.task === "detect") render();
  });
  ui.topk.addEventListener("change", () => send());
  ui.file.addEventListener("change", () => chooseFile(ui.file.files[0]));
  ui.preview.addEventListener("error", () => {
    if (state.file) ui.stage.hidden = true; // the browser cannot show it; the API's answer says why
  });
  for (const name of ["dragenter", "dragover"]) {
    ui.drop.addEventListener(name, (event) => {
      event.preventDefault();
      ui.drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    ui.drop.addEventListener(name, () => ui.drop.classList.remove("over"));
  }
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFile(event.dataTransfer.files[0]);
  });

  loadModels();
})();
