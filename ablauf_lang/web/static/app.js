// ablauf ui: live updates (server-sent events), node details on click, confirmations.
// No build step, no library: everything a run produced is put in the page as text.
"use strict";

(function () {
  var status = function (ok) {
    var dot = document.getElementById("live-status");
    if (dot) { dot.className = "live-status" + (ok === null ? "" : ok ? " on" : " off"); }
  };

  // Every action form asks first (abort says its reason, signal its name and value).
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute("data-confirm");
    if (!question) { return; }
    var extra = [];
    ["reason", "name", "value"].forEach(function (field) {
      var input = form.elements[field];
      if (input && input.value) { extra.push(field + ": " + input.value); }
    });
    if (!window.confirm(question + (extra.length ? "\n" + extra.join("\n") : ""))) {
      ev.preventDefault();
    }
  });

  // Open a stream; on each change fetch the part of the page that changed and swap it in.
  function follow(url, onChange) {
    if (!window.EventSource) { return; }
    var source = new EventSource(url);
    source.addEventListener("open", function () { status(true); });
    source.addEventListener("change", function (ev) { onChange(JSON.parse(ev.data)); });
    source.addEventListener("end", function (ev) {
      onChange(JSON.parse(ev.data));
      source.close();
      status(null);  // the run ended: nothing more will change
    });
    source.addEventListener("error", function () { status(false); });
    return source;
  }

  function fetchText(url) {
    return fetch(url, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.text(); });
  }

  // ---------------------------------------------------------------- the runs list
  var runs = document.getElementById("runs");
  if (runs) {
    var first = true;
    follow(runs.getAttribute("data-live"), function () {
      if (first) { first = false; return; }  // the page was drawn with this state
      fetchText(runs.getAttribute("data-partial")).then(function (html) {
        runs.innerHTML = html;
      }).catch(function () { status(false); });
    });
  }

  // ---------------------------------------------------------------- a run
  var box = document.getElementById("live");
  var detail = document.getElementById("detail");
  if (!box) { return; }
  var runId = box.getAttribute("data-run");
  var selected = null;
  var unfold = (box.getAttribute("data-unfold") || "").split(",").filter(Boolean);

  function partialUrl() {
    var url = box.getAttribute("data-partial");
    return unfold.length ? url + "?unfold=" + encodeURIComponent(unfold.join(",")) : url;
  }

  function mark() {
    var nodes = box.querySelectorAll("[data-node]");
    for (var i = 0; i < nodes.length; i++) {
      var on = nodes[i].getAttribute("data-node") === selected;
      nodes[i].classList.toggle("selected", on);
    }
  }

  function redraw() {
    return fetchText(partialUrl()).then(function (html) {
      box.innerHTML = html;
      mark();
      if (selected !== null) { show(selected); }
    }).catch(function () { status(false); });
  }

  var seen = null;
  follow(box.getAttribute("data-live"), function (state) {
    var key = [state.updated, state.restarts, state.state, state.driving].join("|");
    if (seen === null) { seen = key; return; }  // the page was drawn with this state
    if (key !== seen) { seen = key; redraw(); }
  });

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    return e;
  }

  function value(v) {
    return el("pre", "value", v === undefined ? "" : JSON.stringify(v, null, 2));
  }

  function field(dl, name, content) {
    dl.appendChild(el("dt", null, name));
    var dd = el("dd");
    if (typeof content === "string") { dd.textContent = content; } else { dd.appendChild(content); }
    dl.appendChild(dd);
  }

  function render(node) {
    detail.textContent = "";
    var head = el("h2", null, node.kind + " " + node.id + " ");
    head.appendChild(el("span", "badge state-" + node.state, node.state));
    detail.appendChild(head);
    var dl = el("dl", "facts");
    if (node.action !== undefined) {
      field(dl, "action", node.action);
      field(dl, "payload", value(node.payload));
      if (node.sent !== null && node.sent !== undefined) { field(dl, "sent", value(node.sent)); }
      field(dl, "output", value(node.output));
      if (node.error !== null && node.error !== undefined) { field(dl, "error", value(node.error)); }
      field(dl, "attempt", String(node.attempt));
      field(dl, "dispatched", node.dispatched_at_text || "");
      field(dl, "started", node.started_at_text || "");
      field(dl, "finished", node.finished_at_text || "");
      if (node.wake) { field(dl, "wakes", value(node.wake)); }
    } else {
      field(dl, "children", (node.children || []).join(", "));
    }
    detail.appendChild(dl);
    if (node.attempts && node.attempts.length) {
      detail.appendChild(el("h3", null, "earlier attempts"));
      var table = el("table", "attempts");
      var row = el("tr");
      ["attempt", "state", "started", "finished", "error"].forEach(function (h) {
        row.appendChild(el("th", null, h));
      });
      table.appendChild(row);
      node.attempts.forEach(function (a) {
        var tr = el("tr");
        tr.appendChild(el("td", null, a.attempt));
        tr.appendChild(el("td", null, a.state));
        tr.appendChild(el("td", null, a.started_at_text || ""));
        tr.appendChild(el("td", null, a.finished_at_text || ""));
        tr.appendChild(el("td", null, a.error === null || a.error === undefined ? "" : JSON.stringify(a.error)));
        table.appendChild(tr);
      });
      detail.appendChild(table);
    }
    detail.appendChild(el("h3", null, "context"));
    detail.appendChild(el("p", "hint", node.context_note));
    detail.appendChild(value(node.context));
  }

  function show(id) {
    fetch("/api/runs/" + encodeURIComponent(runId) + "/nodes/" + encodeURIComponent(id),
          { credentials: "same-origin" })
      .then(function (r) { return r.json().then(function (data) { return [r.ok, data]; }); })
      .then(function (pair) {
        if (!pair[0]) { detail.textContent = pair[1].error || "no such node"; return; }
        render(pair[1]);
      })
      .catch(function () { detail.textContent = "could not load the node"; });
  }

  box.addEventListener("click", function (ev) {
    var target = ev.target.closest ? ev.target.closest("[data-node], .fold[data-parent]") : null;
    if (!target) { return; }
    var parent = target.getAttribute("data-parent");
    if (parent !== null && !target.hasAttribute("data-node")) {
      if (unfold.indexOf(parent) < 0) { unfold.push(parent); }
      redraw();
      return;
    }
    selected = target.getAttribute("data-node");
    mark();
    show(selected);
  });
})();
