// The correction box and the chat rating in a real browser (issue 16), against the demo stack
// (scripts/lib/80-browser.sh): two answers in one chat; 👎 on the second with a correction,
// which must land in MLflow as one `expected_response` expectation on that answer's trace and
// come back after a reload; then the whole chat rated 👎, which must land once as a session
// assessment (metadata `mlflow.trace.session`) on the chat's FIRST trace, and go when the
// pressed thumb is clicked again. A screenshot is written under target/browser/.
//
// Env: CHAT_URL, MLFLOW_URL, DEV_USER, SCREENSHOT_DIR; CHROMIUM (default /usr/bin/chromium).

import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { launch, required, step } from "./lib.mjs";

const CHAT_URL = required("CHAT_URL");
const MLFLOW_URL = required("MLFLOW_URL");
const DEV_USER = process.env.DEV_USER || "dev@example.com";
const SCREENSHOTS = process.env.SCREENSHOT_DIR || "target/browser";
const CORRECTION = "The 2024 revenue was 12M, up from 10M.";

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

async function assessments(traceId, name) {
  const res = await fetch(`${MLFLOW_URL}/api/3.0/mlflow/traces/${encodeURIComponent(traceId)}`);
  if (!res.ok) throw new Error(`trace ${traceId}: ${res.status}`);
  const info = await res.json();
  return (info.trace?.trace_info?.assessments || []).filter((a) => a.assessment_name === name && a.valid !== false);
}

async function ask(page, prompt) {
  await page.getByTestId("prompt").fill(prompt);
  await page.keyboard.press("Enter");
  const answer = page.getByTestId("assistant-message").last();
  await waitFor(`the answer to "${prompt}"`, async () => {
    const text = (await answer.locator(".text").textContent()) || "";
    return text.includes(prompt) && (await answer.getByTestId("trace-id").count()) > 0;
  });
  return {
    answer,
    messageId: await answer.getAttribute("data-message-id"),
    traceId: await answer.getByTestId("trace-id").getAttribute("title"),
  };
}

mkdirSync(SCREENSHOTS, { recursive: true });
const browser = await launch();

let page;
try {
  const context = await browser.newContext({ viewport: { width: 900, height: 800 } });
  page = await context.newPage();
  const consoleErrors = [];
  page.on("console", (m) => m.type() === "error" && consoleErrors.push(m.text()));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  step(`opening ${CHAT_URL} in a new chat`);
  await page.goto(CHAT_URL);
  await page.getByRole("button", { name: "New chat" }).click();
  assert.equal(await page.getByTestId("chat-thumb-down").isDisabled(), true, "a chat without answers can be rated");
  const first = await ask(page, "first question of the chat");
  const second = await ask(page, "second question of the chat");
  step(`two answers: ${first.traceId} (first), ${second.traceId}`);
  assert.notEqual(first.traceId, second.traceId);

  step("👎 on the second answer, with a correction");
  await second.answer.getByTestId("thumb-down").click();
  await waitFor("the 👎 to be saved", async () => /saved/.test(await second.answer.getByTestId("vote-status").textContent()));
  await second.answer.getByTestId("correction").fill(CORRECTION);
  await second.answer.getByTestId("comment-send").click();
  await waitFor("the correction to be saved", async () => /saved/.test(await second.answer.getByTestId("vote-status").textContent()));
  const expectations = await waitFor("one expected_response expectation", async () => {
    const all = await assessments(second.traceId, "expected_response");
    return all.length === 1 && all[0].expectation?.value === CORRECTION ? all : null;
  });
  assert.equal(expectations[0].source.source_type, "HUMAN");
  assert.equal(expectations[0].source.source_id, DEV_USER);
  step(`trace ${second.traceId} has expectation ${expectations[0].assessment_id}: "${CORRECTION}"`);

  step("reloading: the correction comes back");
  await page.reload();
  const restored = page.locator(`[data-message-id="${second.messageId}"]`);
  await waitFor("the restored correction", async () => (await restored.getByTestId("correction").inputValue()) === CORRECTION);

  step("rating the whole chat 👎");
  await page.getByTestId("chat-thumb-down").click();
  await waitFor("the chat rating to be saved", async () => /saved/.test(await page.getByTestId("chat-rating-status").textContent()));
  const rating = await waitFor("one session assessment on the first trace", async () => {
    const all = (await assessments(first.traceId, "user_feedback")).filter((a) => a.metadata?.["mlflow.trace.session"]);
    return all.length === 1 && all[0].feedback?.value === false ? all[0] : null;
  });
  assert.equal(rating.source.source_id, DEV_USER);
  assert.equal((await assessments(second.traceId, "user_feedback")).filter((a) => a.metadata?.["mlflow.trace.session"]).length, 0);
  step(`session assessment ${rating.assessment_id} on ${first.traceId}, session ${rating.metadata["mlflow.trace.session"]}`);

  step("reloading: the chat rating comes back; clicking it again retracts it");
  await page.reload();
  await waitFor("the restored chat rating", async () => (await page.getByTestId("chat-thumb-down").getAttribute("aria-pressed")) === "true");
  await page.getByTestId("chat-thumb-down").click();
  await waitFor("the chat rating to be removed", async () => /removed/.test(await page.getByTestId("chat-rating-status").textContent()));
  await waitFor("no session assessment", async () =>
    (await assessments(first.traceId, "user_feedback")).filter((a) => a.metadata?.["mlflow.trace.session"]).length === 0);

  assert.deepEqual(consoleErrors, [], "the page logged errors");
  await page.screenshot({ path: `${SCREENSHOTS}/corrections.png`, fullPage: true });
  step(`screenshot: ${SCREENSHOTS}/corrections.png`);
} catch (e) {
  if (page) await page.screenshot({ path: `${SCREENSHOTS}/corrections-failure.png`, fullPage: true }).catch(() => {});
  console.error(`    [browser] FAILED: ${e.stack || e}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
