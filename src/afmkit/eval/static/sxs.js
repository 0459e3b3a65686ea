// The grading page: fetch the next ungraded pair, post a grade, show the report.
"use strict";

let token = null;

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function renderChoices(choices) {
  const box = document.getElementById("choices");
  if (box.childElementCount) return;
  // A's buttons strongest first, then tie, then B's weakest first: a left-to-right scale.
  const a = choices.filter((c) => c.startsWith("A "));
  const b = choices.filter((c) => c.startsWith("B ")).reverse();
  for (const choice of [...a, "tie", ...b]) {
    const button = document.createElement("button");
    button.textContent = choice;
    button.dataset.choice = choice;
    button.addEventListener("click", () => grade(choice));
    box.appendChild(button);
  }
}

async function loadNext() {
  const response = await fetch("api/next");
  const data = await response.json();
  setText("status", `${data.graded} of ${data.total} pairs graded`);
  document.getElementById("status").dataset.graded = data.graded;
  document.getElementById("status").dataset.total = data.total;
  renderChoices(data.choices);
  if (data.done) {
    token = null;
    document.getElementById("grading").hidden = true;
    document.getElementById("done").hidden = false;
    return;
  }
  token = data.pair.token;
  setText("prompt", data.pair.prompt);
  setText("left", data.pair.left);
  setText("right", data.pair.right);
  document.getElementById("grading").dataset.token = token;
}

async function grade(choice) {
  if (!token) return;
  const sent = token;
  token = null; // one grade per shown pair, even on a double click
  const response = await fetch("api/grade", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token: sent, choice }),
  });
  if (!response.ok) {
    setText("status", `error: ${(await response.json()).detail}`);
    return;
  }
  await loadNext();
}

async function showReport() {
  const response = await fetch("api/report");
  const data = await response.json();
  const box = document.getElementById("report");
  box.replaceChildren();
  if (!response.ok) {
    box.textContent = data.detail;
    return;
  }
  const table = document.createElement("table");
  table.id = "report-table";
  table.innerHTML = "<tr><th>outcome for A</th><th>share (%)</th><th>95% CI</th><th>prompts</th></tr>";
  for (const outcome of ["win", "tie", "lose"]) {
    const r = data[outcome];
    const row = table.insertRow();
    row.dataset.outcome = outcome;
    for (const cell of [outcome, r.rate.toFixed(2), `${r.ci95[0].toFixed(2)}–${r.ci95[1].toFixed(2)}`, r.count]) {
      row.insertCell().textContent = cell;
    }
  }
  const caption = document.createElement("p");
  caption.textContent = `${data.model_a} (A) vs ${data.model_b} (B), ${data.prompts} graded prompts`;
  box.append(caption, table);
}

document.getElementById("show-report").addEventListener("click", showReport);
loadNext();
