// The seekgate console: renders each page from /console/api (the admin API, relayed with this session).
// No inline script, no eval, no innerHTML with data: every node is built with the DOM API.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const content = document.getElementById("content");
  const page = document.body.dataset.page;
  const SVG = "http://www.w3.org/2000/svg";

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "class") el.className = v;
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : String(c));
    }
    return el;
  }
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    for (const c of children) el.append(c);
    return el;
  }
  let uid = 0;
  function field(label, input) {   // every control has a visible label tied to it
    input.id = input.id || "f" + (++uid);
    return h("label", { for: input.id }, label, input);
  }
  function select(name, options, value) {
    return h("select", { name }, options.map(([v, t]) => h("option", { value: v, selected: v === value }, t)));
  }
  function card(title, ...body) { return h("section", { class: "card" }, h("h2", {}, title), ...body); }
  function notice(text, kind) { return h("div", { class: "notice " + (kind || ""), role: "status" }, text); }
  function table(headers, rows) {
    return h("div", { class: "scroll" }, h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
  }
  function show(...nodes) { content.replaceChildren(...nodes); }
  function download(name, type, text) {
    const url = URL.createObjectURL(new Blob([text], { type }));
    const a = h("a", { href: url, download: name });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  }
  function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "Z") : "never"; }

  async function api(method, path, body, raw) {
    const headers = { "X-CSRF-Token": csrf };   // bound to this session; a cookie alone changes nothing
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch("api/" + path, { method, headers, credentials: "same-origin",
      body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401) { window.location.href = "signin"; throw new Error("signed out"); }
    if (raw) { if (!r.ok) throw new Error((await r.json()).error); return r.text(); }
    const doc = await r.json();
    if (!r.ok) throw new Error(doc.error || ("HTTP " + r.status));
    return doc;
  }
  function failed(err) { return notice("Failed: " + err.message, "bad"); }

  // A bar chart in SVG: one bar per point; `err` draws a second series (errors) over the first.
  function bars(points, label, valueOf, errOf, tickOf) {
    const w = 600, ht = 130, n = Math.max(points.length, 1), bw = w / n;
    const max = Math.max(1, ...points.map(valueOf));
    const svg = s("svg", { class: "chart", viewBox: `0 0 ${w} ${ht + 16}`, role: "img", "aria-label": label,
                           preserveAspectRatio: "none" }, s("title", {}, label));
    points.forEach((p, i) => {
      const v = valueOf(p), y = ht - (v / max) * ht;
      const bar = s("rect", { class: "bar", x: i * bw + 1, y, width: Math.max(bw - 2, 1), height: ht - y });
      bar.append(s("title", {}, `${tickOf(p)}: ${v}`));
      svg.append(bar);
      if (errOf && errOf(p)) {
        const e = errOf(p), ey = ht - (e / max) * ht;
        svg.append(s("rect", { class: "bar err", x: i * bw + 1, y: ey, width: Math.max(bw - 2, 1), height: ht - ey }));
      }
    });
    svg.append(s("line", { class: "axis", x1: 0, x2: w, y1: ht, y2: ht }));
    svg.append(s("text", { x: 0, y: ht + 12 }, points.length ? tickOf(points[0]) : ""));
    svg.append(s("text", { x: w, y: ht + 12, "text-anchor": "end" }, points.length ? tickOf(points[points.length - 1]) : ""));
    svg.append(s("text", { x: 2, y: 10 }, "max " + max));
    return svg;
  }
  const hhmm = (t) => new Date(t * 1000).toISOString().slice(11, 16);
  const ymd = (t) => new Date(t * 1000).toISOString().slice(0, 10);

  // ------------------------------------------------------------------ overview
  async function overview() {
    const d = await api("GET", "overview");
    const sum = (k) => d.per_minute.reduce((a, p) => a + p[k], 0);
    const up = d.triton_up === true ? h("span", { class: "up" }, "up") : d.triton_up === false
      ? h("span", { class: "down" }, "down") : h("span", { class: "muted" }, "not probed yet");
    const top = (rows) => table(["name", "requests", "tokens"],
      rows.map((r) => h("tr", {}, h("td", {}, h("code", {}, r.name)), h("td", {}, r.requests), h("td", {}, r.tokens))));
    show(h("div", { class: "grid" },
      card("Triton", h("p", {}, "Upstream is ", up, ".")),
      card("Last hour", h("p", {}, `${sum("requests")} requests, ${sum("errors")} refused or failed.`))),
      h("div", { class: "grid" },
        card("Requests and errors per minute (last hour)",
          bars(d.per_minute, "Requests per minute, errors in red", (p) => p.requests, (p) => p.errors, (p) => hhmm(p.t))),
        card("Tokens per day (last 14 days)",
          bars(d.tokens_per_day, "Tokens per day", (p) => p.tokens, null, (p) => ymd(p.t)))),
      h("div", { class: "grid" }, card("Top keys today", top(d.top_keys)), card("Top models today", top(d.top_models))));
  }

  // ------------------------------------------------------------------ keys
  const DAY3 = 72 * 3600 * 1000;
  function expiringSoon(k) {
    return k.status === "active" && k.expires_at && (Date.parse(k.expires_at) - Date.now()) < DAY3;
  }
  function secretPanel(title, key, extra) {
    const out = h("output", { class: "secret", id: "secret" }, key);
    const copied = h("span", { id: "copied", role: "status" });
    return card(title, notice("Shown once: copy it now. seekgate keeps only its hash.", ""), out,
      h("p", {}, h("button", { type: "button", class: "secondary", onclick: () => navigator.clipboard.writeText(key)
        .then(() => { copied.textContent = "Copied."; }, () => { copied.textContent = "Copy failed: select the text."; }) },
        "Copy key"), " ", copied), extra || null);
  }
  // Every key, page after page: the tree needs each key's parent and the filters run here, so the keys
  // page shows the whole fleet, 1000 keys a request (the most the API gives).
  async function allKeys() {
    const all = [];
    for (let path = "keys?size=1000"; path;) {
      const r = await api("GET", path);
      all.push(...r.keys);
      // `next` is the admin API's path (/admin/v1/keys?...); through the console that is api/keys?...
      path = r.next && "keys" + r.next.slice(r.next.indexOf("?"));
    }
    return all;
  }
  async function keys(message) {
    const all = await allKeys();
    const f = { owner: h("input", { name: "owner", type: "search" }), tier: select("tier", [["", "any"], ["app", "app"], ["device", "device"], ["user", "user"]], ""),
      role: h("input", { name: "role", type: "search" }), label: h("input", { name: "label", type: "search", placeholder: "team=nlp" }),
      status: select("status", [["", "any"], ["active", "active"], ["revoked", "revoked"], ["expired", "expired"], ["expiring", "expiring in 72 h"]], "active") };
    const grace = h("input", { name: "grace", value: "24h", size: 6 });
    const treeBox = h("div");
    const panel = h("div", { id: "panel" }, message || null);
    function matches(k) {
      // Split at the first "=" only: a label's value may hold one itself (a URL's query, a base64 pad).
      const eq = f.label.value.indexOf("="), lk = eq < 0 ? f.label.value : f.label.value.slice(0, eq);
      const lv = eq < 0 ? undefined : f.label.value.slice(eq + 1);
      return (!f.owner.value || k.owner.includes(f.owner.value)) && (!f.tier.value || k.tier === f.tier.value)
        && (!f.role.value || k.roles.includes(f.role.value))
        // Own labels only: `in` (or a bare lookup) also finds Object.prototype's constructor, toString, __proto__.
        && (!f.label.value || (Object.hasOwn(k.labels, lk) && (lv === undefined || k.labels[lk] === lv)))
        && (!f.status.value || (f.status.value === "expiring" ? expiringSoon(k) : k.status === f.status.value));
    }
    async function act(what, k) {
      try {
        if (what === "rotate") {
          const r = await api("POST", `keys/${k.id}/rotate`, { grace: grace.value });
          panel.replaceChildren(secretPanel(`Successor of ${k.id}: ${r.key_id}`, r.key,
            h("p", {}, `The old key works until ${when(r.old.expires_at)} (grace ${grace.value}).`)));
        } else if (what === "revoke") {
          if (!window.confirm(`Revoke ${k.id} and every key under it?`)) return;
          const r = await api("POST", `keys/${k.id}/revoke`, {});
          panel.replaceChildren(notice(`Revoked ${k.id}: ${r.revoked} key(s) newly revoked.`, "ok"));
        } else {
          if (!window.confirm(`Treat ${k.id} as compromised: revoke it and everything under it, issue a replacement?`)) return;
          const r = await api("POST", `keys/${k.id}/revoke`, { compromised: true });
          const report = JSON.stringify(r.report, null, 2);
          panel.replaceChildren(secretPanel(`Replacement for compromised ${k.id}: ${r.replacement.key_id}`, r.replacement.key,
            h("div", {}, h("p", {}, `Revoked: ${r.revoked.join(", ")}.`),
              h("button", { type: "button", id: "download-report", onclick: () => download(`leak-report-${k.id}.json`, "application/json", report) }, "Download usage report"),
              h("pre", { id: "report", tabindex: "0", "aria-label": "Usage report" }, report))));
        }
        await refresh();
      } catch (err) { panel.replaceChildren(failed(err)); }
      panel.focus();
    }
    // user/app → sessions: tokens are not stored, so the list comes from their audited mints (minted
    // within the TTL, not revoked), fetched when asked for rather than once per key on every redraw.
    const sessionBoxes = {};
    async function sessions(k) {
      const box = sessionBoxes[k.id];
      try {
        const r = await api("GET", `keys/${k.id}/sessions`);
        box.replaceChildren(r.sessions.length
          ? h("ul", { class: "sessions", "aria-label": `Live sessions of ${k.id}` }, r.sessions.map((x) =>
            h("li", { "data-jti": x.jti }, h("span", { class: "badge" }, "session"), h("code", {}, x.jti),
              h("span", { class: "muted" }, `${x.via} · expires ${when(new Date(x.expires_at * 1000).toISOString())}`))))
          : h("p", { class: "muted", role: "status" }, `No live session of ${k.id}.`));
      } catch (err) { box.replaceChildren(failed(err)); }
    }
    function row(k) {
      const soon = expiringSoon(k);
      const minting = k.status === "active" && (k.tier === "user" || k.tier === "app");
      const acts = k.status === "active" ? h("span", { class: "actions" },
        minting ? h("button", { type: "button", class: "secondary", "aria-label": `Sessions of ${k.id}`, onclick: () => sessions(k) }, "Sessions") : null,
        h("button", { type: "button", class: "secondary", "aria-label": `Rotate ${k.id}`, onclick: () => act("rotate", k) }, "Rotate"),
        h("button", { type: "button", class: "secondary", "aria-label": `Revoke ${k.id}`, onclick: () => act("revoke", k) }, "Revoke"),
        h("button", { type: "button", class: "danger", "aria-label": `Compromised ${k.id}`, onclick: () => act("compromised", k) }, "Compromised…")) : null;
      return h("div", { class: "keyrow", "data-key-id": k.id }, h("code", {}, k.id), h("span", { class: "badge" }, k.tier),
        h("span", {}, k.owner), k.roles.map((r) => h("span", { class: "badge" }, r)),
        Object.entries(k.labels).map(([a, b]) => h("span", { class: "badge" }, `${a}=${b}`)),
        h("span", { class: "status-" + k.status }, k.status),
        h("span", { class: soon ? "badge warn" : "muted" }, (soon ? "expires soon: " : "expires ") + when(k.expires_at)), acts);
    }
    function refreshTree() {
      const shown = all.filter(matches), ids = new Set(shown.map((k) => k.id));
      const kids = {};
      shown.forEach((k) => { if (k.parent_id && ids.has(k.parent_id)) (kids[k.parent_id] = kids[k.parent_id] || []).push(k); });
      const node = (k) => h("li", { class: expiringSoon(k) ? "expiring" : "" }, row(k),
        sessionBoxes[k.id] = h("div", { class: "session-box" }),
        kids[k.id] ? h("ul", {}, kids[k.id].map(node)) : null);
      const roots = shown.filter((k) => !(k.parent_id && ids.has(k.parent_id)));
      treeBox.replaceChildren(roots.length ? h("ul", { class: "tree", "aria-label": "Keys: app → device, user" }, roots.map(node))
        : h("p", { class: "muted" }, "No key matches."));
    }
    async function refresh() { all.splice(0, all.length, ...(await allKeys())); refreshTree(); }
    const c = { tier: select("tier", [["user", "user"], ["app", "app"], ["device", "device"]], "user"),
      owner: h("input", { name: "owner", required: true }), roles: h("input", { name: "roles", placeholder: "user, ml" }),
      parent: h("input", { name: "parent_id", placeholder: "for a device key" }), expires: h("input", { name: "expires", placeholder: "90d (tier default)" }),
      models: h("input", { name: "models", placeholder: "any" }) };
    const list = (v) => v.split(",").map((x) => x.trim()).filter(Boolean);
    const create = h("form", { class: "inline", "aria-label": "Create a key", onsubmit: async (e) => {
      e.preventDefault();
      const body = { tier: c.tier.value, owner: c.owner.value, roles: list(c.roles.value), models: list(c.models.value) };
      if (c.parent.value) body.parent_id = c.parent.value.trim();
      if (c.expires.value) body.expires = c.expires.value.trim();
      try {
        const r = await api("POST", "keys", body);
        panel.replaceChildren(secretPanel(`New ${r.tier} key ${r.key_id} for ${r.owner}`, r.key));
        create.reset(); await refresh();
      } catch (err) { panel.replaceChildren(failed(err)); }
    } }, field("Tier", c.tier), field("Owner", c.owner), field("Roles", c.roles), field("Parent key id", c.parent),
      field("Expires in", c.expires), field("Models", c.models), h("button", { type: "submit" }, "Create key"));
    const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter keys", onsubmit: (e) => e.preventDefault(), oninput: refreshTree, onchange: refreshTree },
      field("Owner", f.owner), field("Tier", f.tier), field("Role", f.role), field("Label", f.label), field("Status", f.status));
    // Not in the filter form: a change there redraws the tree, which would swallow the click that blurred it.
    const graceForm = h("form", { class: "inline", "aria-label": "Rotation settings", onsubmit: (e) => e.preventDefault() },
      field("Rotation grace", grace));
    show(card("Create a key", create), panel, card("Keys", filters, graceForm, treeBox));
    panel.tabIndex = -1;
    refreshTree();
  }

  // ------------------------------------------------------------------ usage
  async function usage() {
    const group = select("group", [["key", "key"], ["owner", "owner"], ["model", "model"]], "key");
    const period = select("period", [["day", "day"], ["month", "month"]], "day");
    const out = h("div");
    let rows = [];
    async function load() {
      try {
        const d = await api("GET", `usage?group=${group.value}&period=${period.value}`);
        rows = d.rows.map((r) => ({ ...r, budget: (d.budgets[r[d.group]] || {})[period.value === "day" ? "daily_tokens" : "monthly_tokens"] }));
        const totals = {};
        rows.forEach((r) => { totals[r[d.period]] = (totals[r[d.period]] || 0) + r.tokens; });
        const pts = Object.entries(totals).map(([p, t]) => ({ p, t }));
        out.replaceChildren(
          bars(pts, `Tokens per ${d.period}`, (x) => x.t, null, (x) => x.p),
          table([d.group, d.period, "requests", "input tokens", "output tokens", "tokens", "budget", "used"],
            rows.map((r) => h("tr", {}, h("td", {}, h("code", {}, r[d.group])), h("td", {}, r[d.period]), h("td", {}, r.requests),
              h("td", {}, r.input_tokens), h("td", {}, r.output_tokens), h("td", {}, r.tokens),
              h("td", {}, r.budget || "—"), h("td", { class: r.budget && r.tokens > r.budget ? "error" : "" },
                r.budget ? Math.round((100 * r.tokens) / r.budget) + "%" : "—")))));
        if (!rows.length) out.append(h("p", { class: "muted" }, "No served requests in this range."));
      } catch (err) { out.replaceChildren(failed(err)); }
    }
    function csv() {
      const cols = [group.value, period.value, "requests", "input_tokens", "output_tokens", "tokens", "budget"];
      // An owner or model name is anyone's text: one starting with = + - @ (or a tab or CR) would run as a
      // formula in a spreadsheet (CSV injection), so it is written with a leading ' and read as text.
      const cell = (v) => { const t = String(v === undefined || v === null ? "" : v); return /^[=+\-@\t\r]/.test(t) ? "'" + t : t; };
      const q = (v) => `"${cell(v).replace(/"/g, '""')}"`;
      download(`seekgate-usage-${group.value}-${period.value}.csv`, "text/csv",
        [cols.join(","), ...rows.map((r) => cols.map((c) => q(r[c])).join(","))].join("\n") + "\n");
    }
    show(card("Tokens against budgets", h("form", { class: "filters", onsubmit: (e) => { e.preventDefault(); load(); } },
      field("Group by", group), field("Per", period), h("button", { type: "submit" }, "Show"),
      h("button", { type: "button", class: "secondary", onclick: csv }, "Export CSV")), out));
    await load();
  }

  // ------------------------------------------------------------------ audit
  async function audit() {
    const f = { key_id: h("input", { name: "key_id" }), owner: h("input", { name: "owner" }), model: h("input", { name: "model" }),
      status: select("status", [["", "any"], ["allowed", "allowed"], ["denied", "denied"], ["error", "error"]], ""),
      reason: h("input", { name: "reason" }), client_ip: h("input", { name: "client_ip" }),
      since: h("input", { name: "since", type: "datetime-local" }), until: h("input", { name: "until", type: "datetime-local" }) };
    const out = h("div"), detail = h("div", { id: "record", tabindex: "-1" });
    const PAGE = 25;
    let offset = 0;
    function query() {
      const q = new URLSearchParams();
      for (const [k, el] of Object.entries(f)) {
        if (!el.value) continue;
        q.set(k, el.type === "datetime-local" ? el.value + ":00Z" : el.value.trim());
      }
      return q;
    }
    async function one(id) {
      try { detail.replaceChildren(card(`Record ${id}`, h("pre", {}, JSON.stringify(await api("GET", "audit/" + id), null, 2)))); detail.focus(); }
      catch (err) { detail.replaceChildren(failed(err)); }
    }
    async function load() {
      const q = query(); q.set("limit", PAGE); q.set("offset", offset);
      try {
        const d = await api("GET", "audit?" + q);
        out.replaceChildren(table(["time", "key", "owner", "resource", "status", "HTTP", "reason", "client IP", ""],
          d.records.map((r) => h("tr", {}, h("td", {}, when(r.timestamp)), h("td", {}, h("code", {}, r.key_id || "—")),
            h("td", {}, r.actor || "—"), h("td", {}, r.resource || "—", r.model ? ` (${r.model})` : ""),
            h("td", { class: r.status }, r.status), h("td", {}, r.http_status), h("td", {}, r.reason || ""),
            h("td", {}, r.client_ip), h("td", {}, h("button", { type: "button", class: "secondary", "aria-label": `Show record ${r.event_id}`, onclick: () => one(r.event_id) }, "Show"))))),
          h("div", { class: "pager" },
            h("button", { type: "button", class: "secondary", disabled: offset === 0, onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, "Newer"),
            h("span", { id: "audit-count" }, `${d.total ? offset + 1 : 0}–${offset + d.records.length} of ${d.total}`),
            h("button", { type: "button", class: "secondary", disabled: offset + PAGE >= d.total, onclick: () => { offset += PAGE; load(); } }, "Older")));
      } catch (err) { out.replaceChildren(failed(err)); }
    }
    async function exportJsonl() {
      try { download("seekgate-audit.jsonl", "application/x-ndjson", await api("GET", "audit?format=jsonl&" + query(), undefined, true)); }
      catch (err) { out.replaceChildren(failed(err)); }
    }
    show(card("Search the audit log", h("form", { class: "filters", role: "search", "aria-label": "Audit search", onsubmit: (e) => { e.preventDefault(); offset = 0; load(); } },
      field("Key id", f.key_id), field("Owner", f.owner), field("Model", f.model), field("Status", f.status), field("Reason", f.reason),
      field("Client IP", f.client_ip), field("From (UTC)", f.since), field("To (UTC)", f.until),
      h("button", { type: "submit" }, "Search"), h("button", { type: "button", class: "secondary", onclick: exportJsonl }, "Export JSONL")), out), detail);
    await load();
  }

  // ------------------------------------------------------------------ policies
  async function policies() {
    const d = await api("GET", "policies");
    const lr = d.last_reload;
    const reload = !lr ? notice(`Policy version ${d.version}, loaded at start; no reload since.`, "ok")
      : lr.ok ? notice(`Policy version ${d.version}: last reload at ${new Date(lr.at * 1000).toISOString()} succeeded.`, "ok")
        : notice(`Last reload at ${new Date(lr.at * 1000).toISOString()} FAILED; version ${lr.version} stays in force: ${lr.error}`, "bad");
    const cond = (o) => Object.entries(o).map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(", ") : typeof v === "object" ? JSON.stringify(v) : v}`).join("; ");
    const rules = table(["rule", "effect", "where", "resources", "actions", "conditions"], d.rules.map((r) => h("tr", {},
      h("td", {}, h("code", {}, r.id), h("div", { class: "muted" }, r.description)), h("td", { class: r.effect === "allow" ? "allowed" : "denied" }, r.effect),
      h("td", {}, `${r.file.split("/").pop()}:${r.line}`), h("td", {}, r.resources.join(", ")), h("td", {}, r.actions.join(", ")),
      h("td", {}, [cond(r.subject), cond(r.environment), Object.keys(r.limits).length ? "limits " + cond(r.limits) : ""].filter(Boolean).join(" | ") || "—"))));
    const q = { key_id: h("input", { name: "key_id", placeholder: "or attributes below" }), tier: select("tier", [["user", "user"], ["app", "app"], ["device", "device"], ["session", "session"]], "user"),
      roles: h("input", { name: "roles", placeholder: "user" }), owner: h("input", { name: "owner" }),
      method: select("method", [["POST", "POST"], ["GET", "GET"], ["PUT", "PUT"], ["DELETE", "DELETE"]], "POST"),
      path: h("input", { name: "path", value: "/v2/models/deepseek/generate", size: 30 }), client_ip: h("input", { name: "client_ip", value: "127.0.0.1" }),
      time: h("input", { name: "time", type: "datetime-local" }) };
    const result = h("div", { id: "decision", role: "status" });
    const form = h("form", { class: "filters", "aria-label": "Would this be allowed?", onsubmit: async (e) => {
      e.preventDefault();
      const body = { method: q.method.value, path: q.path.value.trim(), client_ip: q.client_ip.value.trim() };
      if (q.time.value) body.time = q.time.value + ":00Z";
      if (q.key_id.value.trim()) body.key_id = q.key_id.value.trim();
      else body.principal = { tier: q.tier.value, owner: q.owner.value, roles: q.roles.value.split(",").map((x) => x.trim()).filter(Boolean) };
      try {
        const r = await api("POST", "policies/evaluate", body);
        result.replaceChildren(notice(r.allowed ? `Allowed by rule ${r.rule} (${r.resource}, ${r.action}).`
          : `Denied at ${r.stage}: ${r.reason}${r.rule ? ", deciding rule " + r.rule : ""}${r.resource ? ` (${r.resource}, ${r.action})` : ""}.`, r.allowed ? "ok" : "bad"));
      } catch (err) { result.replaceChildren(failed(err)); }
    } }, field("Key id", q.key_id), field("Tier", q.tier), field("Roles", q.roles), field("Owner", q.owner), field("Method", q.method),
      field("Path", q.path), field("Client IP", q.client_ip), field("Time (UTC)", q.time), h("button", { type: "submit" }, "Evaluate"));
    show(reload, card("Would this be allowed?", form, result), card(`Rules in force (${d.rules.length})`, rules));
  }

  // ------------------------------------------------------------------ crypto
  async function crypto(message) {
    const d = await api("GET", "crypto/status");
    const dl = (o) => h("dl", {}, Object.entries(o).map(([k, v]) => [h("dt", {}, k),
      h("dd", {}, v !== null && typeof v === "object" && !Array.isArray(v) ? dl(v) : Array.isArray(v) ? v.map((x) => typeof x === "object" ? JSON.stringify(x) : x).join(", ") : String(v))]));
    const ops = [["rotate-dek", "Rotate data key"], ["rotate-root", "Rotate root key"], ["rotate-jwt", "Rotate session signing key"], ["rotate-pepper", "Rotate pepper"]];
    const out = h("div", { role: "status" }, message || null);
    show(out, card("Rotate now", h("p", { class: "muted" }, "Each rotation keeps the old key for an overlap, so nothing in flight breaks."),
      h("div", { class: "pager" }, ops.map(([op, label]) => h("button", { type: "button", class: "secondary", onclick: async () => {
        if (!window.confirm(`${label} now?`)) return;
        try { const r = await api("POST", "crypto/" + op, {}); await crypto(notice(`${label}: done. ${JSON.stringify(r)}`, "ok")); }
        catch (err) { out.replaceChildren(failed(err)); }
      } }, label)))), card("Keys and rotations", dl(d)));
  }

  const pages = { overview, keys, usage, audit, policies, crypto };
  pages[page]().catch((err) => show(failed(err)));
})();
