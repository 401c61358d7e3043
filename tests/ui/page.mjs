// Drives the status page in a real headless Chromium (Debian's, through playwright-core):
// opens /ui, waits until the row of lock $LOCK shows holder $OWNER, prints HELD and saves a
// screenshot, waits for a line on stdin (the test released the lock meanwhile), then waits until
// the row is gone from the live page (no reload), prints FREE and saves a second screenshot.
//
// usage: node page.mjs BASE_URL LOCK OWNER SCREENSHOT_DIR   (NODE_PATH: playwright-core's dir)
import { createRequire } from "node:module";
import * as readline from "node:readline";

const require = createRequire(process.env.NODE_PATH + "/");
const { chromium } = require("playwright-core");
const [base, lock, owner, shots] = process.argv.slice(2);

const browser = await chromium.launch({
  executablePath: process.env.LEASEHOLD_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 700 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(base + "/ui");
  const row = page.locator(`tr[data-lock="${lock}"]`);
  await row.filter({ hasText: owner }).waitFor({ timeout: 15000 });
  await page.locator("#live.ok").waitFor({ timeout: 15000 });
  await page.screenshot({ path: shots + "/ui-held.png", fullPage: true });
  console.log("HELD " + (await row.innerText()).replace(/\s+/g, " "));
  const input = readline.createInterface({ input: process.stdin });
  await new Promise((resolve) => input.once("line", resolve));
  input.close(); // else stdin keeps Node running after the browser closes
  await row.waitFor({ state: "detached", timeout: 15000 });
  await page.screenshot({ path: shots + "/ui-free.png", fullPage: true });
  if (errors.length) throw new Error("page errors: " + errors.join("; "));
  console.log("FREE");
} finally {
  await browser.close();
}
