/* Per-service charts of calls/s and p99 over the last hour (Chart.js, vendored). */
(function () {
  "use strict";
  var REFRESH_MS = 15000;

  function hhmm(epoch) {
    var d = new Date(epoch * 1000);
    return ("0" + d.getHours()).slice(-2) + ":" + ("0" + d.getMinutes()).slice(-2);
  }

  function draw(canvas) {
    fetch(canvas.dataset.seriesUrl, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var labels = data.labels.map(hhmm);
        if (canvas.chart) {
          canvas.chart.data.labels = labels;
          canvas.chart.data.datasets[0].data = data.rate;
          canvas.chart.data.datasets[1].data = data.p99_ms;
          canvas.chart.update("none");
          return;
        }
        canvas.chart = new Chart(canvas, {
          type: "line",
          data: {labels: labels, datasets: [
            {label: "calls/s", data: data.rate, yAxisID: "rate", borderColor: "#2563eb",
             backgroundColor: "rgba(37, 99, 235, 0.08)", fill: true, tension: 0.2},
            {label: "p99 ms", data: data.p99_ms, yAxisID: "p99", borderColor: "#d97706",
             backgroundColor: "#d97706", spanGaps: true, tension: 0.2,
             pointRadius: 2.5}  // p99 has gaps: a lone minute with calls must still show
          ]},
          options: {
            animation: false, responsive: true, maintainAspectRatio: false,
            interaction: {mode: "index", intersect: false},
            elements: {point: {radius: 0, hitRadius: 6}, line: {borderWidth: 2}},
            plugins: {legend: {position: "top", align: "end", labels: {boxWidth: 12, boxHeight: 2}}},
            scales: {
              x: {ticks: {maxTicksLimit: 13, maxRotation: 0}, grid: {display: false}},
              rate: {position: "left", beginAtZero: true, title: {display: true, text: "calls/s"}},
              p99: {position: "right", beginAtZero: true, grid: {drawOnChartArea: false},
                    title: {display: true, text: "p99 ms"}}
            }
          }
        });
      })
      .catch(function () { /* a failed refresh keeps the last chart */ });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var canvases = document.querySelectorAll("canvas[data-series-url]");
    if (!canvases.length || typeof Chart === "undefined") { return; }
    canvases.forEach(draw);
    setInterval(function () { canvases.forEach(draw); }, REFRESH_MS);
  });
})();
