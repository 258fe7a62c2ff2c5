// Sorts a table by the clicked column: ascending first, then descending; numbers by value with
// missing values last either way; ties keep the table's original order (from the data-i index).
"use strict";
for (const table of document.querySelectorAll("table.sortable")) {
  const body = table.tBodies[0];
  Array.from(body.rows).forEach((r, i) => { r.dataset.i = i; });
  const heads = Array.from(table.tHead.rows[0].cells);
  heads.forEach((th, col) => {
    const sort = () => {
      const asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach((h) => h.setAttribute("aria-sort", "none"));
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      const num = th.dataset.type === "num";
      const key = (r) => {
        const c = r.cells[col];
        if (!c) return null;
        if (!num) return c.textContent;
        return c.dataset.v === "" ? null : Number(c.dataset.v);
      };
      const rows = Array.from(body.rows).sort((a, b) => Number(a.dataset.i) - Number(b.dataset.i));
      rows.sort((a, b) => {
        const x = key(a), y = key(b);
        if (x === null || y === null) return (x === null) - (y === null);
        const d = num ? x - y : x.localeCompare(y);
        return asc ? d : -d;
      });
      rows.forEach((r) => body.appendChild(r));
    };
    th.addEventListener("click", sort);
    th.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); } });
  });
}
