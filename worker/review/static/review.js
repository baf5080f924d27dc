// Keyboard shortcuts for the review page. Progressive enhancement: every action is a plain form or link.
(function () {
  "use strict";

  function typing(event) {
    const t = event.target;
    return t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName));
  }

  function go(id) {
    const link = document.getElementById(id);
    if (link) window.location.assign(link.href);
  }

  function queueKeys(table, key) {
    const rows = Array.from(table.querySelectorAll("tbody tr[data-href]"));
    if (!rows.length) return false;
    let i = rows.findIndex((r) => r.classList.contains("selected"));
    if (key === "j" || key === "k") {
      if (i >= 0) rows[i].classList.remove("selected");
      i = key === "j" ? Math.min(rows.length - 1, i + 1) : Math.max(0, i - 1);
      rows[i].classList.add("selected");
      rows[i].scrollIntoView({ block: "nearest" });
      return true;
    }
    if (key === "x" && i >= 0) {
      const box = rows[i].querySelector("input[type=checkbox]");
      if (box) box.checked = !box.checked;
      return true;
    }
    if (key === "Enter" || key === "o") {
      window.location.assign(rows[Math.max(0, i)].dataset.href);
      return true;
    }
    return false;
  }

  // Native pixels: one image pixel per device pixel, scrolled inside the viewer; the crop boxes follow.
  function zoom() {
    const wrap = document.querySelector(".stage-wrap");
    const img = document.getElementById("image");
    const button = document.getElementById("zoom");
    if (!wrap || !img) return false;
    const on = wrap.classList.toggle("native");
    img.style.width = on && img.naturalWidth ? img.naturalWidth / window.devicePixelRatio + "px" : "";
    if (button) button.setAttribute("aria-pressed", on ? "true" : "false");
    return true;
  }

  function itemKeys(key) {
    const form = document.getElementById("actions");
    const button = form && form.querySelector(`button[data-key="${key}"]`);
    if (button) {
      form.querySelectorAll("button").forEach((b) => (b.disabled = b !== button));
      form.requestSubmit(button);
      return true;
    }
    if (key === "j") { go("next"); return true; }
    if (key === "k") { go("prev"); return true; }
    if (key === "u" || key === "Escape") { go("back"); return true; }
    if (key === "z") return zoom();
    if (key === "b") {
      const boxes = document.querySelector(".boxes");
      if (boxes) boxes.classList.toggle("hidden");
      return true;
    }
    return false;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event)) return;
    const help = document.getElementById("help");
    if (event.key === "?") { help.hidden = !help.hidden; event.preventDefault(); return; }
    if (event.key === "Escape" && help && !help.hidden) { help.hidden = true; return; }
    const table = document.querySelector("table[data-keys=queue]");
    const handled = table ? queueKeys(table, event.key) : itemKeys(event.key);
    if (handled) event.preventDefault();
  });

  document.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest("#zoom")) { zoom(); return; }
    const row = event.target.closest && event.target.closest("tr[data-href]");
    if (row && !event.target.closest("a, input, label, .c-pick")) window.location.assign(row.dataset.href);
    const help = document.getElementById("help");
    if (help && event.target === help) help.hidden = true;
  });
})();
