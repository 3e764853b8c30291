.PHONY: run test setup browser
run:     ; bash scripts/lab.sh run
test:    ; bash scripts/lab.sh test
setup:   ; bash scripts/lab.sh setup
browser: ; bash scripts/lab.sh browser
