// Drives the UI of Databricks' chat app template (databricks/app-templates e2e-chatbot-app-next,
// the real one, built from a checkout) in headless Chromium, through feedback-proxy. Run by
// scripts/template-e2e.sh, one phase per invocation (the script restarts servers and stops
// MLflow between phases):
//
//   first     chat, click 👍, reload (the vote comes back), click 👎        → state file
//   second    (after the template's server and the proxy restarted) open the chat: 👎 is shown;
//             click 👍
//   chat      a second chat (before an MLflow outage)                       → state file
//   vote      (MLflow stopped) open it, click 👍, reload: 👍 is shown
//
// The browser sends the platform's identity headers (X-Forwarded-*), as Databricks Apps would
// and as the template's own Playwright tests do. The template's own markup is found by the
// test ids it ships (multimodal-input, send-button, message-assistant, thumbs-up-button, …).
//
// Env: APP_URL, STATE (a JSON file), CHROMIUM (default /usr/bin/chromium), SCREENSHOT_DIR.

import assert from "node:assert/strict";
import { mkdirSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import { chromium } from "playwright-core";

const APP_URL = required("APP_URL");
const STATE = required("STATE");
const SHOTS = process.env.SCREENSHOT_DIR || "target/browser";
const phase = process.argv[2];
const headers = {
  "X-Forwarded-User": "ada-id",
  "X-Forwarded-Email": "ada@example.com",
  "X-Forwarded-Preferred-Username": "ada",
};

function required(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run scripts/template-e2e.sh)`);
  return v;
}
const step = (m) => console.log(`    [template ui] ${m}`);
const load = () => (existsSync(STATE) ? JSON.parse(readFileSync(STATE, "utf8")) : {});
const save = (s) => writeFileSync(STATE, JSON.stringify(s, null, 2));

const up = (page) => page.getByTestId("thumbs-up-button").last();
const down = (page) => page.getByTestId("thumbs-down-button").last();

async function shown(page, which) {
  // The template marks the chosen thumb with a colour class.
  const [b, cls] = which === "up" ? [up(page), /text-green-600/] : [down(page), /text-red-600/];
  await b.waitFor({ state: "visible", timeout: 30_000 });
  await assertClass(b, cls);
}

async function assertClass(locator, re) {
  const deadline = Date.now() + 15_000;
  for (;;) {
    const c = (await locator.getAttribute("class")) || "";
    if (re.test(c)) return;
    if (Date.now() > deadline) throw new Error(`expected class ${re} on the button, got "${c}"`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function vote(page, which) {
  const res = page.waitForResponse((r) => r.url().endsWith("/api/feedback") && r.request().method() === "POST");
  await (which === "up" ? up(page) : down(page)).click();
  const r = await res;
  const body = await r.json();
  step(`POST /api/feedback ${which}: ${r.status()} ${JSON.stringify(body)}`);
  assert.equal(r.status(), 200);
  await shown(page, which);
  return body;
}

async function newChat(page, text) {
  await page.goto(APP_URL + "/");
  const input = page.getByTestId("multimodal-input");
  await input.waitFor({ timeout: 30_000 });
  await input.fill(text);
  await page.getByTestId("send-button").click();
  const answer = page.getByTestId("message-assistant").last();
  await answer.getByText("echo:").first().waitFor({ timeout: 60_000 });
  await up(page).waitFor({ state: "visible", timeout: 60_000 });
  await page.waitForURL(/\/chat\/[^/]+$/, { timeout: 30_000 });
  const chatUrl = page.url();
  step(`answered at ${chatUrl}: ${(await answer.innerText()).split("\n")[0]}`);
  return chatUrl;
}

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium" });
try {
  const context = await browser.newContext({ extraHTTPHeaders: headers });
  const page = await context.newPage();
  page.on("pageerror", (e) => step(`page error: ${e.message}`));
  const s = load();
  if (phase === "first") {
    s.chatUrl = await newChat(page, "what is the answer?");
    s.first = await vote(page, "up");
    await page.reload();
    await shown(page, "up");
    step("after reload: 👍 is shown");
    await vote(page, "down");
  } else if (phase === "second") {
    await page.goto(s.chatUrl);
    await shown(page, "down");
    step("after restarting the template's server and the proxy: 👎 is shown");
    s.second = await vote(page, "up");
  } else if (phase === "chat") {
    s.outageChatUrl = await newChat(page, "and during an outage?");
  } else if (phase === "vote") {
    await page.goto(s.outageChatUrl);
    s.outage = await vote(page, "up");
    await page.reload();
    await shown(page, "up");
    step("MLflow is down; after reload: 👍 is shown");
  } else {
    throw new Error(`unknown phase ${phase}`);
  }
  mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: `${SHOTS}/template-${phase}.png`, fullPage: true });
  save(s);
} finally {
  await browser.close();
}
