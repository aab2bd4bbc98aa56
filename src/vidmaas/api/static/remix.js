// Remix: run a finished task again with a new prompt (POST /v1/tasks/{id}/rerun), from
// a small dialog on the page (#remix in index.html).
//
// Guarantees:
// - The dialog opens prefilled with the task's prompt, focused on it; Escape or Cancel
//   closes it without sending anything; an empty prompt is caught before it is sent.
// - One request at a time: the button is disabled while it is in flight.
// - The created task goes to create(task), the same path as the form's submit (the new
//   card at the top), and the dialog closes; a refusal (a quota's 429, a validation
//   error, an unreachable server) is shown in the dialog, which stays open with the
//   prompt as typed. A 401 signs out (the page's api() does), and nothing more is shown.

import { $ } from "./dom.js";

export function mountRemix({ api, t, create, modelName }) {
  const dialog = $("#remix");
  const form = $("#remix-form");
  const prompt = $("#remix-prompt");
  const error = $("#remix-error");
  const submit = $("#remix-submit");
  let source = null; // the task being remixed
  let busy = false;

  const showError = (message) => {
    error.textContent = message;
    prompt.setAttribute("aria-invalid", "true");
  };
  const clearError = () => {
    error.textContent = "";
    prompt.removeAttribute("aria-invalid");
  };

  $("#remix-cancel").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    source = null;
    clearError();
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!source || busy) return;
    clearError();
    const text = prompt.value.trim();
    if (!text) {
      showError(t("promptRequired"));
      prompt.focus();
      return;
    }
    busy = true;
    submit.disabled = true;
    submit.textContent = t("submitting");
    try {
      const task = await api(`/v1/tasks/${encodeURIComponent(source.id)}/rerun`, { method: "POST", json: { prompt: text } });
      dialog.close();
      create(task);
    } catch (e) {
      if (e.status !== 401) {
        showError(e.message);
        prompt.focus();
      } else {
        dialog.close();
      }
    } finally {
      busy = false;
      submit.disabled = false;
      submit.textContent = t("generate");
    }
  });

  return {
    open(task) {
      source = task;
      clearError();
      prompt.value = task.prompt || "";
      $("#remix-of").textContent = t("remixOf", { model: modelName(task.model) });
      if (!dialog.open) dialog.showModal();
      prompt.focus();
      prompt.setSelectionRange(prompt.value.length, prompt.value.length);
    },
    close() {
      if (dialog.open) dialog.close();
    },
  };
}
