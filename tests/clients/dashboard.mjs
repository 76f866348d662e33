// Opens the gateway's dashboard in headless Chromium (Debian's, driven by playwright-core) and
// reports what each panel shows, the console's errors, and how long the page took to render.
//
// Usage: node dashboard.mjs SPEC_JSON
//   SPEC_JSON: {"url": ".../dashboard", "admin_key": "lgw_..." or null, "screenshot": "path.png"}
// Prints one JSON object on stdout: {"panels": {...texts}, "errors": [...], "render_ms": n,
// "bytes": {"bundle": n, "api": n}, "signed_in": bool, "cookies": [...]}.
import { chromium } from "playwright-core";

const spec = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--no-proxy-server"],
});
const errors = [];
const bytes = { bundle: 0, api: 0 };
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.on("console", (m) => { if (m.type() === "error") errors.push(`console ${m.type()}: ${m.text()}`); });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  page.on("response", async (r) => {
    const kind = r.url().includes("/admin/api/") ? "api" : r.url().includes("/dashboard") ? "bundle" : null;
    if (kind) {
      try { bytes[kind] += (await r.body()).length; } catch { /* redirects and the like */ }
    }
  });
  await page.goto(spec.url, { waitUntil: "load" });
  let signedIn = false;
  if (spec.admin_key) {
    await page.waitForSelector("#login:not([hidden])", { timeout: 10000 });
    await page.fill("#login-key", spec.admin_key);
    await page.click("#login button");
    signedIn = true;
  }
  await page.waitForSelector("#panels:not([hidden])", { timeout: 10000 });
  await page.waitForFunction(() => window.__rendered >= 1, null, { timeout: 10000 });
  const text = (sel) => page.$eval(sel, (e) => e.innerText);
  const panels = {
    header: await text("header"),
    accounts: await text("#accounts-panel"),
    usage: await text("#usage-panel"),
    keys: await text("#keys-panel"),
    trouble: await text("#trouble-panel"),
    hourly_total: await page.$eval("#hourly", (e) => e.getAttribute("data-total")),
    daily_total: await page.$eval("#daily", (e) => e.getAttribute("data-total")),
    bars: await page.$$eval("#daily rect", (r) => r.length),
  };
  // Names come from the config and from clients (model names): shown as text, never run.
  panels.injected = await page.evaluate(
    () => window.__xss !== undefined || document.querySelectorAll("main img, main b").length > 0);
  // The model view of the same charts.
  await page.selectOption("#by", "by_model");
  panels.legend_by_model = await text("#legend");
  const renderMs = await page.evaluate(() => window.__renderMs);
  const cookies = await page.context().cookies();
  if (spec.screenshot) await page.screenshot({ path: spec.screenshot, fullPage: true });
  console.log(JSON.stringify({ panels, errors, render_ms: renderMs, bytes, signed_in: signedIn, cookies }));
} finally {
  await browser.close();
}
