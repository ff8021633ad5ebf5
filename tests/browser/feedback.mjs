// The end-to-end test in a real browser: the reference chat page, through feedback-proxy, to a
// real MLflow agent and tracking server (the demo stack, started by scripts/lib/80-browser.sh).
//
// Send a message, watch the answer stream in, click 👎 with a comment and pick a reason (the
// `reason` name the schema endpoint offers), reload and see the vote and the reason restored,
// see the reason land in MLflow as an assessment of its own, change the vote to 👍 (the reason
// goes with the 👎); then check through the MLflow REST API that the trace of that answer
// carries exactly one `user_feedback` assessment: value true, source HUMAN with the dev user,
// the comment as rationale, and no `reason`. A screenshot is written under target/browser/.
//
// Env: CHAT_URL, MLFLOW_URL, DEV_USER, SCREENSHOT_DIR; CHROMIUM (default /usr/bin/chromium).

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { launch, required, step } from "./lib.mjs";

const CHAT_URL = required("CHAT_URL");
const MLFLOW_URL = required("MLFLOW_URL");
const DEV_USER = process.env.DEV_USER || "dev@example.com";
const SCREENSHOTS = process.env.SCREENSHOT_DIR || "target/browser";
const COMMENT = "missing the 2024 numbers";
const PROMPT = "hello from the browser test";



async function waitFor(what, fn, timeoutMs = 30_000, everyMs = 200) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ""}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

async function mlflow(path) {
  const res = await fetch(MLFLOW_URL + path);
  if (!res.ok) throw new Error(`${path}: ${res.status}`);
  return res.json();
}

mkdirSync(SCREENSHOTS, { recursive: true });
const browser = await launch();

let page;
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 700 } });
  page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  step(`opening ${CHAT_URL}`);
  await page.goto(CHAT_URL);
  await page.getByTestId("prompt").fill(PROMPT);
  await page.keyboard.press("Enter");

  // The answer streams in: we must see it grow through partial states before it is complete.
  const answer = page.getByTestId("assistant-message").last();
  const seen = new Set();
  const full = await waitFor("the streamed answer", async () => {
    const text = (await answer.locator(".text").textContent()) || "";
    if (text && text !== "…") seen.add(text);
    return text.includes(PROMPT) && (await answer.getByTestId("trace-id").count()) > 0 ? text : null;
  }, 30_000, 20);
  const partials = [...seen].filter((t) => t !== full);
  step(`answer streamed through ${partials.length} partial states: ${JSON.stringify(full)}`);
  assert.ok(partials.length >= 2, `the answer did not stream (states seen: ${JSON.stringify([...seen])})`);

  const messageId = await answer.getAttribute("data-message-id");
  const traceId = await answer.getByTestId("trace-id").getAttribute("title");
  assert.ok(messageId, "assistant message has no id");
  assert.match(traceId, /^tr-[0-9a-f]{32}$/);
  step(`message ${messageId} linked to trace ${traceId}`);

  step("voting 👎 with a comment");
  await answer.getByTestId("thumb-down").click();
  await waitFor("the 👎 to be saved", async () => /saved/.test(await answer.getByTestId("vote-status").textContent()));
  await answer.getByTestId("comment").fill(COMMENT);
  await answer.getByTestId("comment-send").click();
  await waitFor("the comment to be saved", async () => /saved/.test(await answer.getByTestId("vote-status").textContent()));
  assert.equal(await answer.getByTestId("thumb-down").getAttribute("aria-pressed"), "true");

  step("picking a reason for the 👎");
  const reasons = answer.getByTestId("reasons");
  const offered = await reasons.locator("button").allTextContents();
  assert.deepEqual(offered, ["incorrect", "unhelpful", "unsafe", "other"]);
  await reasons.getByTestId("reason-unsafe").click();
  await waitFor("the reason to be saved", async () => /reason saved/.test(await answer.getByTestId("vote-status").textContent()));
  assert.equal(await answer.getByTestId("reason-unsafe").getAttribute("aria-pressed"), "true");
  assert.equal(await answer.getByTestId("reason-incorrect").getAttribute("aria-pressed"), "false");
  await page.screenshot({ path: `${SCREENSHOTS}/reasons.png`, fullPage: true });

  step("reloading: the vote and the comment come back");
  await page.reload();
  const restored = page.locator(`[data-message-id="${messageId}"]`);
  await waitFor("the restored vote", async () => (await restored.getByTestId("thumb-down").getAttribute("aria-pressed")) === "true");
  assert.equal(await restored.getByTestId("thumb-up").getAttribute("aria-pressed"), "false");
  assert.equal(await restored.getByTestId("comment").inputValue(), COMMENT);
  await waitFor("the restored reason", async () => (await restored.getByTestId("reason-unsafe").getAttribute("aria-pressed")) === "true");

  const reasonsIn = async () => {
    const info = await mlflow(`/api/3.0/mlflow/traces/${encodeURIComponent(traceId)}`);
    return (info.trace?.trace_info?.assessments || []).filter((a) => a.assessment_name === "reason");
  };
  const reasonAssessment = await waitFor("the reason in MLflow", async () => {
    const r = await reasonsIn();
    return r.length === 1 && r[0].feedback?.value === "unsafe" ? r[0] : null;
  });
  assert.equal(reasonAssessment.source.source_id, DEV_USER);
  step(`the reason is assessment ${reasonAssessment.assessment_id} ("unsafe") on ${traceId}`);

  step("changing the vote to 👍");
  await restored.getByTestId("thumb-up").click();
  const status = await waitFor("the 👍 to be saved", async () => {
    const s = await restored.getByTestId("vote-status").textContent();
    return /saved/.test(s) ? s : null;
  });
  step(`status: ${status}`);
  assert.equal(await restored.getByTestId("thumb-up").getAttribute("aria-pressed"), "true");
  assert.equal(await restored.getByTestId("thumb-down").getAttribute("aria-pressed"), "false");
  assert.equal(await restored.getByTestId("reasons").count(), 0, "reasons still shown after 👍");
  await waitFor("the reason to leave MLflow with the 👎", async () => (await reasonsIn()).length === 0);

  step(`checking the trace in MLflow (${MLFLOW_URL})`);
  const assessments = await waitFor("exactly one assessment holding 👍", async () => {
    const info = await mlflow(`/api/3.0/mlflow/traces/${encodeURIComponent(traceId)}`);
    const all = (info.trace?.trace_info?.assessments || []).filter((a) => a.assessment_name === "user_feedback");
    return all.length === 1 && all[0].feedback?.value === true ? all : null;
  });
  const a = assessments[0];
  assert.equal(a.source.source_type, "HUMAN");
  assert.equal(a.source.source_id, DEV_USER);
  assert.equal(a.rationale, COMMENT);
  assert.notEqual(a.valid, false);
  step(`trace ${traceId} has one user_feedback assessment ${a.assessment_id}: true, HUMAN ${DEV_USER}, rationale "${a.rationale}"`);

  assert.deepEqual(consoleErrors, [], "the page logged errors");
  await page.screenshot({ path: `${SCREENSHOTS}/feedback.png`, fullPage: true });
  step(`screenshot: ${SCREENSHOTS}/feedback.png`);
} catch (e) {
  if (page) await page.screenshot({ path: `${SCREENSHOTS}/failure.png`, fullPage: true }).catch(() => {});
  console.error(`    [browser] FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
