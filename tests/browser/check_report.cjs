// Opens a report in headless Chromium and prints what tests/report.rs checks, as JSON:
// every console error, page error, failed or non-local request and image that did not load;
// the first column of a table before and after one and two clicks on a column header.
//
// node check_report.cjs REPORT.html SCREENSHOT.png [TABLE_ID COLUMN]
// playwright-core is looked up in $UNETPP_NODE_MODULES (default /var/tmp/unetpp-node/node_modules,
// where .ci/run installs it), chromium at $UNETPP_CHROMIUM (default /usr/bin/chromium).
"use strict";
const path = require("path");
const { pathToFileURL } = require("url");
const modules = process.env.UNETPP_NODE_MODULES || "/var/tmp/unetpp-node/node_modules";
const { chromium } = require(path.join(modules, "playwright-core"));
const fs = require("fs");
const os = require("os");

async function main() {
  const [report, shot, tableId, column] = process.argv.slice(2);
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "unetpp-chromium-"));
  // A fresh profile each time: playwright's persistent context is how it takes --user-data-dir.
  const browser = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.UNETPP_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1200, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const errors = [];
  try {
    const page = await browser.newPage();
    page.on("console", (m) => { if (m.type() === "error") errors.push(`console: ${m.text()}`); });
    page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
    page.on("dialog", (d) => { errors.push(`dialog: ${d.message()}`); d.dismiss(); });
    page.on("requestfailed", (r) => errors.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
    page.on("request", (r) => {
      if (!/^(file|data):/.test(r.url())) errors.push(`network request: ${r.url()}`);
    });
    page.on("response", (r) => { if (r.status() >= 400) errors.push(`HTTP ${r.status()}: ${r.url()}`); });
    await page.goto(pathToFileURL(path.resolve(report)).href, { waitUntil: "load" });
    // Lazy thumbnails below the fold would never load in a screenshot-sized viewport.
    const broken = await page.evaluate(async () => {
      const bad = [];
      for (const img of document.images) {
        img.loading = "eager";
        try { await img.decode(); } catch (e) { bad.push(img.getAttribute("src").slice(0, 120)); }
        if (img.naturalWidth === 0) bad.push(img.getAttribute("src").slice(0, 120));
      }
      return bad;
    });
    broken.forEach((b) => errors.push(`image did not load: ${b}`));
    const images = await page.evaluate(() => document.images.length);
    const title = await page.title();
    await page.screenshot({ path: shot, fullPage: false });
    const out = { errors, images, title };
    if (tableId) {
      const first = () => page.$$eval(`#${tableId} tbody tr`, (rows) => rows.map((r) => r.cells[0].textContent));
      const heads = `#${tableId} thead th`;
      const idx = await page.$$eval(heads, (hs, c) => hs.findIndex((h) => h.textContent === c), column);
      if (idx < 0) throw new Error(`no column ${column} in #${tableId}`);
      const header = page.locator(heads).nth(idx);
      out.before = await first();
      await header.click();
      out.ascending = await first();
      out.sort_after_one = await header.getAttribute("aria-sort");
      await header.click();
      out.descending = await first();
      out.sort_after_two = await header.getAttribute("aria-sort");
    }
    console.log(JSON.stringify(out));
  } finally {
    await browser.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((e) => { console.error(e); process.exit(2); });
