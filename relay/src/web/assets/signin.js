// Spends the one-time sign-in link. The token travels in the URL fragment so it never reaches a server log or a
// Referer; it is removed from the address bar before anything else happens, so a reload, a bookmark or the
// history cannot replay it. Link unfurlers run no JavaScript, so they cannot spend it either.
(function () {
  "use strict";

  function status(text, isError) {
    var el = document.getElementById("signin-status");
    if (!el) return;
    el.textContent = text;
    el.classList.toggle("error", Boolean(isError));
    if (isError) el.setAttribute("role", "alert");
  }

  function tokenFromHash(hash) {
    var params = new URLSearchParams(String(hash || "").replace(/^#/, ""));
    var token = params.get("t");
    return token && token.length <= 512 ? token : null;
  }

  async function signIn() {
    var token = tokenFromHash(location.hash);
    if (location.hash) history.replaceState(null, "", location.pathname + location.search);
    if (!token) {
      status("This sign-in link has no token: type /dashboard in Discord for a new one.", true);
      return;
    }
    var res;
    try {
      res = await fetch("/dashboard/api/signin", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ token: token }),
      });
    } catch (e) {
      status("The relay could not be reached: check your connection, then open the link again.", true);
      return;
    }
    if (res.status === 204 || res.ok) {
      status("Signed in. Opening the dashboard…", false);
      location.replace("/dashboard/");
      return;
    }
    var message = "Sign-in failed (" + res.status + "): type /dashboard in Discord for a new link.";
    try {
      var body = await res.json();
      if (body && typeof body.error === "string" && body.error) message = body.error;
    } catch (e) {
      // Not JSON (a proxy's error page): the generic message above says what to do.
    }
    status(message, true);
  }

  if (typeof document !== "undefined" && typeof location !== "undefined") signIn();
})();
