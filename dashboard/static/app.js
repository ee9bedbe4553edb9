// Fedsite dashboard: pages, the selected run and the live updates. The page polls GET /api/runs
// every POLL_MS (an ETag makes an unchanged answer a 304) and reloads the open page's data when a
// run's version changed, so new rounds and client rows appear without a reload.
"use strict";

(() => {
  const POLL_MS = 1500;
  const PAGES = ["overview", "curves", "rounds", "clients", "privacy", "offsite", "config"];
  const state = {
    runs: [], selected: null, page: "overview", overlay: null, versions: "", loaded: {},
    clients: { round: "", status: "", sort: "round", desc: true, offset: 0, limit: 100 },
  };
  const $ = (id) => document.getElementById(id);

  async function getJSON(url) {
    const response = await fetch(url, { cache: "no-cache", credentials: "same-origin" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  const run = () => state.runs.find((r) => r.id === state.selected);
  const api = (path) => `/api/runs/${encodeURIComponent(state.selected)}${path}`;

  // ---------------------------------------------------------------------------- pages
  async function showOverview() {
    const o = await getJSON(api(""));
    const total = o.total_rounds || 0;
    $("progress-bar").style.width = total ? `${Math.min(100, (100 * o.rounds_recorded) / total)}%` : "0";
    $("progress-text").textContent = total ? `round ${o.round} of ${total}` : `round ${o.round}`;
    Fed.facts($("overview-facts"), [
      ["status", o.status, "status"],
      ["round", total ? `${o.round} / ${total}` : String(o.round), "round"],
      ["elapsed", Fed.seconds(o.elapsed_seconds), "elapsed"],
      ["ETA", o.status === "finished" ? "done" : o.eta_seconds === null ? "–" : Fed.seconds(o.eta_seconds), "eta"],
      ["last update", o.last_update_seconds === null ? "–" : `${Fed.seconds(o.last_update_seconds)} ago`, "last-update"],
      ["client updates", String(o.client_rows), "client-rows"],
    ]);
    const latest = o.latest || {};
    $("latest-title").textContent = o.round ? `Latest round (${o.round})` : "Latest round";
    const labels = { eval_accuracy: "accuracy", eval_loss: "eval loss", train_loss: "train loss", upload_bytes: "upload", download_bytes: "download",
      round_seconds: "round time", simulated_seconds: "simulated time", federated_eval_accuracy: "federated accuracy", offsite_eval_accuracy: "plug-in accuracy" };
    const pairs = Object.entries(latest).map(([k, v]) => [labels[k] || k, k.endsWith("bytes") ? Fed.bytes(v) : k.endsWith("seconds") ? Fed.seconds(v) : Fed.num(v)]);
    if (Fed.isNum(o.initial.eval_accuracy)) pairs.unshift(["initial accuracy", Fed.num(o.initial.eval_accuracy)]);
    Fed.keyValues($("latest-table"), pairs.length ? pairs : [["", "no round finished yet"]]);
    Fed.keyValues($("settings-table"), Object.entries(o.settings).map(([k, v]) => [k, String(v)]));
    FedCharts.overview(run());
    const skipped = Object.entries(o.skipped_lines || {}).map(([f, n]) => `${n} malformed line(s) in ${f} skipped`);
    $("overview-notes").textContent = skipped.join("; ");
  }

  function showCurves() {
    const box = Fed.clear($("overlay-runs"));
    if (state.overlay === null) state.overlay = new Set(state.runs.slice(0, 8).map((r) => r.id));
    for (const r of state.runs) {
      const input = Fed.el("input", { type: "checkbox", value: r.id, "data-run": r.id });
      input.checked = state.overlay.has(r.id);
      input.addEventListener("change", () => { input.checked ? state.overlay.add(r.id) : state.overlay.delete(r.id); showCurves(); });
      box.append(Fed.el("label", {}, input, ` ${r.name}`));
    }
    FedCharts.curves(state.runs.filter((r) => state.overlay.has(r.id)));
  }

  function showRounds() {
    Fed.rounds($("rounds-table"), run().rounds);
  }

  async function showClients() {
    const c = state.clients;
    const query = new URLSearchParams({ sort: c.sort, order: c.desc ? "desc" : "asc", offset: c.offset, limit: c.limit });
    if (c.round !== "") query.set("round", c.round);
    if (c.status) query.set("status", c.status);
    const page = await getJSON(api(`/clients?${query}`));
    const select = $("clients-round");
    const options = ["", ...page.rounds.map(String)];
    if ([...select.options].map((o) => o.value).join() !== options.join()) {
      Fed.clear(select);
      for (const value of options) select.append(Fed.el("option", { value }, value === "" ? "all" : value));
      select.value = c.round;
    }
    const statuses = Object.entries(page.statuses).map(([s, n]) => `${n} ${s}`).join(", ");
    const reasons = Object.entries(page.reasons).map(([r, n]) => `${n}× ${r}`).join("; ");
    $("clients-summary").textContent = `${page.total} updates in all; ${statuses || "none"} here${reasons ? ` — reasons: ${reasons}` : ""}`;
    Fed.clients($("clients-table"), page, { key: c.sort, desc: c.desc }, (key) => {
      c.desc = c.sort === key ? !c.desc : false;
      c.sort = key; c.offset = 0; showClients();
    });
    const end = Math.min(page.matching, page.offset + page.rows.length);
    $("clients-range").textContent = page.matching ? `${page.offset + 1}–${end} of ${page.matching}` : "0 of 0";
    $("clients-prev").disabled = page.offset === 0;
    $("clients-next").disabled = end >= page.matching;
  }

  async function showPrivacy() {
    const p = await getJSON(api("/privacy"));
    $("privacy-none").hidden = p.present;
    Fed.facts($("privacy-facts"), [
      ["mode", p.mode || "–", "mode"],
      ["run-level ε", Fed.num(p.run_epsilon), "run-epsilon"],
      ["basis", p.run_epsilon_basis, "basis"],
      ["budget ε", p.budget === null ? "none" : Fed.num(p.budget), "budget"],
      ["δ", Fed.num(p.delta), "delta"],
      ["clients in ledger", String(p.clients), "clients"],
      ["at or over budget", String(p.over_budget.length), "over-budget"],
    ]);
    FedCharts.privacy(p);
    $("privacy-more").textContent = p.clients > 100 ? `the 100 clients with the highest ε of ${p.clients}` : "";
    Fed.table($("privacy-table"), [
      { key: "client", label: "client", cls: "text" }, { key: "epsilon", label: "ε spent" }, { key: "rounds", label: "rounds in ledger" },
      { key: "left", label: "ε left", format: (v) => (v === null ? "–" : Fed.num(v)) },
    ], p.latest.slice(0, 100).map((r) => ({ ...r, left: p.budget === null ? null : p.budget - r.epsilon })), {
      rowClass: (r) => (p.budget !== null && r.epsilon >= p.budget ? "rejected" : ""), empty: "no ledger entries",
    });
  }

  async function showOffsite() {
    const o = await getJSON(api("/offsite"));
    $("offsite-none").hidden = o.present;
    FedCharts.offsite(o);
    const cols = ["round", "eval_accuracy", "offsite_eval_accuracy", "emulator_eval_accuracy", "eval_loss", "offsite_eval_loss", "emulator_eval_loss", "lora_clients", "emulator_clients"];
    Fed.table($("offsite-table"), cols.map((key) => ({ key, label: key.replace(/_/g, " ") })), o.rounds.slice().reverse(), { empty: "no round yet" });
    const shown = (k, v) => (k.endsWith("bytes") ? Fed.bytes(v) : typeof v === "number" ? Fed.num(v) : typeof v === "object" ? JSON.stringify(v) : String(v));
    Fed.keyValues($("offsite-package"), Object.entries(o.package).map(([k, v]) => [k.replace(/_/g, " "), shown(k, v)]));
  }

  async function showConfig() {
    const c = await getJSON(api("/config"));
    Fed.keyValues($("config-table"), Object.entries(c.config).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]));
  }

  const SHOW = { overview: showOverview, curves: showCurves, rounds: showRounds, clients: showClients, privacy: showPrivacy, offsite: showOffsite, config: showConfig };

  async function render() {
    for (const page of PAGES) $(`page-${page}`).hidden = page !== state.page || !state.runs.length;
    document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.page === state.page));
    $("empty").hidden = state.runs.length > 0;
    const r = run();
    const badge = $("run-status");
    badge.textContent = r ? r.status : "";
    badge.className = `badge ${r && r.status === "finished" ? "finished" : r ? "live" : ""}`;
    if (!r) return;
    try {
      await SHOW[state.page]();
      document.body.dataset.rendered = `${state.page}:${r.id}:${r.rounds.length}`;
    } catch (err) {
      $("connection").textContent = `could not load ${state.page}: ${err.message}`;
    }
  }

  function fillRunSelect() {
    const select = $("run-select");
    const wanted = state.runs.map((r) => `${r.id}:${r.name}`).join("|");
    if (select.dataset.runs !== wanted) {
      Fed.clear(select);
      for (const r of state.runs) select.append(Fed.el("option", { value: r.id }, r.name));
      select.dataset.runs = wanted;
    }
    if (!state.runs.some((r) => r.id === state.selected)) state.selected = state.runs.length ? state.runs[0].id : null;
    select.value = state.selected || "";
  }

  // ---------------------------------------------------------------------------- live updates
  async function poll() {
    try {
      const data = await getJSON("/api/runs");
      state.runs = data.runs;
      if (state.overlay) for (const r of state.runs) if (!state.loaded[r.id]) state.overlay.add(r.id);
      for (const r of state.runs) state.loaded[r.id] = true;
      fillRunSelect();
      const versions = state.runs.map((r) => `${r.id}=${r.version}`).join(",");
      $("connection").textContent = `updated ${new Date().toLocaleTimeString()}`;
      const current = run();
      if (versions !== state.versions || (state.page === "overview" && current && current.status !== "finished")) {
        state.versions = versions; // an open overview of a live run also refreshes its elapsed time and ETA
        await render();
      }
    } catch (err) {
      $("connection").textContent = "dashboard unreachable (the run may have ended; `fedsite dashboard OUT` shows it): retrying";
    }
    setTimeout(poll, POLL_MS);
  }

  function route() {
    const page = location.hash.replace(/^#/, "");
    state.page = PAGES.includes(page) ? page : "overview";
    render();
  }

  function start() {
    $("run-select").addEventListener("change", (e) => { state.selected = e.target.value; state.clients.offset = 0; render(); });
    $("clients-round").addEventListener("change", (e) => { state.clients.round = e.target.value; state.clients.offset = 0; showClients(); });
    $("clients-status").addEventListener("change", (e) => { state.clients.status = e.target.value; state.clients.offset = 0; showClients(); });
    $("clients-prev").addEventListener("click", () => { state.clients.offset = Math.max(0, state.clients.offset - state.clients.limit); showClients(); });
    $("clients-next").addEventListener("click", () => { state.clients.offset += state.clients.limit; showClients(); });
    window.addEventListener("hashchange", route);
    const page = location.hash.replace(/^#/, "");
    state.page = PAGES.includes(page) ? page : "overview";
    poll();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
